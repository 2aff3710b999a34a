// @generated automatically by Diesel CLI.

diesel::table! {
    accounts (id) {
        id -> Uuid,
        balance -> Int8,
    }
}

diesel::table! {
    transfers (id) {
        id -> Uuid,
        from_id -> Uuid,
        to_id -> Uuid,
        amount -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(accounts, transfers,);
