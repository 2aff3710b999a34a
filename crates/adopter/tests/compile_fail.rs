//! Misuse that must not compile: each file in `ui/` is one, with the
//! compiler's error beside it (`ui/*.stderr`). Regenerate those with
//! `TRYBUILD=overwrite cargo test -p adopter --test compile_fail` after a
//! compiler upgrade changes the wording, and read the diff.

#[test]
fn misuse_does_not_compile() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
