//! What the app needs of the `accounts` table against what a table made
//! elsewhere is (the Python tutorial's `accounts (id UUID PRIMARY KEY,
//! balance INT8)`, say): each difference, whether the app can still run on
//! it, and the statement that fixes it. Pure, and tested case by case.

/// One column as `information_schema.columns` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// `data_type`: `uuid`, `bigint`, `integer`...
    pub data_type: String,
    /// `is_nullable` is `YES`.
    pub nullable: bool,
}

/// The table as the catalog describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// Its columns.
    pub columns: Vec<Column>,
    /// The primary key's columns.
    pub primary_key: Vec<String>,
    /// Its check constraints' clauses, as the server prints them.
    pub checks: Vec<String>,
}

impl Shape {
    /// Parses what the inspection query aggregates: `name type YES|NO`
    /// columns joined by `,`, the key's columns joined by `,`, and check
    /// clauses joined by ` AND `.
    pub fn from_catalog(columns: &str, primary_key: &str, checks: &str) -> Self {
        let columns = columns
            .split(',')
            .filter_map(|c| {
                let mut words = c.split_whitespace();
                let name = words.next()?.to_owned();
                let rest: Vec<&str> = words.collect();
                let (nullable, type_words) = rest.split_last()?;
                Some(Column {
                    name,
                    data_type: type_words.join(" "),
                    nullable: *nullable == "YES",
                })
            })
            .collect();
        let list = |text: &str, sep: &str| {
            text.split(sep)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Self {
            columns,
            primary_key: list(primary_key, ","),
            checks: list(checks, " AND "),
        }
    }

    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// One way the table differs from what the app needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// What differs, in a few words.
    pub what: String,
    /// The statement that fixes it, when one does.
    pub fix: Option<String>,
    /// Whether the app cannot run on the table as it is.
    pub blocking: bool,
}

fn differs(what: &str, fix: Option<&str>, blocking: bool) -> Difference {
    Difference {
        what: what.to_owned(),
        fix: fix.map(str::to_owned),
        blocking,
    }
}

/// What differs between `shape` and the app's table (the migration's:
/// `id UUID PRIMARY KEY, balance INT8 NOT NULL, CHECK (balance >= 0)`).
/// Extra columns are left alone.
pub fn differences(shape: &Shape) -> Vec<Difference> {
    let mut found = Vec::new();
    match shape.column("id") {
        None => found.push(differs("it has no column id", None, true)),
        Some(c) if c.data_type != "uuid" => found.push(Difference {
            what: format!("id is {}, not UUID", c.data_type),
            fix: Some("ALTER TABLE accounts ALTER COLUMN id TYPE UUID USING id::UUID".to_owned()),
            blocking: true,
        }),
        Some(_) => {}
    }
    match shape.column("balance") {
        None => found.push(differs("it has no column balance", None, true)),
        Some(c) => {
            if c.data_type != "bigint" {
                found.push(Difference {
                    what: format!("balance is {}, not INT8", c.data_type),
                    fix: Some("ALTER TABLE accounts ALTER COLUMN balance TYPE INT8".to_owned()),
                    blocking: true,
                });
            }
            if c.nullable {
                found.push(differs(
                    "balance is not NOT NULL",
                    Some("ALTER TABLE accounts ALTER COLUMN balance SET NOT NULL"),
                    false,
                ));
            }
        }
    }
    if shape.primary_key != ["id"] {
        let what = match shape.primary_key.as_slice() {
            [] => "it has no primary key".to_owned(),
            key => format!("its primary key is ({}), not (id)", key.join(", ")),
        };
        // Without it a retry after a commit in doubt cannot meet its rows
        // (ON CONFLICT (id) needs the key), and ids may repeat.
        found.push(Difference {
            what,
            fix: shape
                .primary_key
                .is_empty()
                .then(|| "ALTER TABLE accounts ADD PRIMARY KEY (id)".to_owned()),
            blocking: false,
        });
    }
    let keeps_non_negative = shape.checks.iter().any(|clause| {
        let bare: String = clause
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '(' | ')'))
            .collect();
        bare.to_ascii_lowercase().contains("balance>=0")
    });
    if !keeps_non_negative {
        found.push(differs(
            "no check keeps balance >= 0",
            Some("ALTER TABLE accounts ADD CONSTRAINT balance_non_negative CHECK (balance >= 0)"),
            false,
        ));
    }
    found
}

/// The differences as one line: what differs, then the statements that fix
/// it; `nulls` is the count of rows whose balance is NULL, when known.
pub fn describe(found: &[Difference], nulls: Option<i64>) -> String {
    let what: Vec<&str> = found.iter().map(|d| d.what.as_str()).collect();
    let mut line = format!(
        "table \"accounts\" differs from what the app needs: {}",
        what.join("; ")
    );
    if let Some(n @ 1..) = nulls {
        let rows = if n == 1 { "row holds" } else { "rows hold" };
        line.push_str(&format!(
            " ({n} {rows} a NULL balance, which this app never reads: it moves money only between \
             accounts it created; give them a balance before SET NOT NULL)"
        ));
    }
    let fixes: Vec<&str> = found.iter().filter_map(|d| d.fix.as_deref()).collect();
    if !fixes.is_empty() {
        line.push_str(&format!("; fix it with: {}", fixes.join("; ")));
    }
    line
}

/// What a table made elsewhere lacks, in words, and whether the app can
/// run on it: the one place a difference becomes a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The differences and their fixes, as one line ([`describe`]).
    pub line: String,
    /// Whether the app cannot run on the table until it is fixed.
    pub blocking: bool,
}

/// Compares `shape` with what the app needs: `None` when nothing differs.
/// Counts the NULL balances (on `conn`) only when the table allows them.
pub fn assess(conn: &mut diesel::PgConnection, shape: &Shape) -> Option<Finding> {
    let found = differences(shape);
    if found.is_empty() {
        return None;
    }
    let nullable = shape
        .columns
        .iter()
        .any(|c| c.name == "balance" && c.nullable);
    let nulls = nullable.then(|| super::null_balances(conn).ok()).flatten();
    Some(Finding {
        line: describe(&found, nulls),
        blocking: found.iter().any(|d| d.blocking),
    })
}

impl Finding {
    /// The error a blocking finding ends a run with.
    pub fn refusal(&self) -> String {
        format!("{}; the app cannot run on it until then", self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(columns: &str, key: &str, checks: &str) -> Shape {
        Shape::from_catalog(columns, key, checks)
    }

    #[test]
    fn the_apps_own_table_differs_in_nothing() {
        let ours = shape("balance bigint NO,id uuid NO", "id", "((balance >= 0))");
        assert_eq!(differences(&ours), vec![]);
        // CockroachDB prints its check clauses differently.
        let cockroach = shape(
            "id uuid NO,balance bigint NO",
            "id",
            "CHECK (balance >= 0:::INT8)",
        );
        assert_eq!(differences(&cockroach), vec![]);
    }

    #[test]
    fn the_python_tutorials_table_lacks_not_null_and_the_check() {
        let python = shape("balance bigint YES,id uuid NO", "id", "");
        let found = differences(&python);
        assert!(found.iter().all(|d| !d.blocking), "{found:?}");
        assert_eq!(
            describe(&found, Some(0)),
            "table \"accounts\" differs from what the app needs: balance is not NOT NULL; no check \
             keeps balance >= 0; fix it with: ALTER TABLE accounts ALTER COLUMN balance SET NOT NULL; \
             ALTER TABLE accounts ADD CONSTRAINT balance_non_negative CHECK (balance >= 0)"
        );
        assert!(describe(&found, Some(2))
            .contains("(2 rows hold a NULL balance, which this app never reads"));
        assert!(describe(&found, Some(1)).contains("(1 row holds a NULL balance"));
    }

    #[test]
    fn a_narrower_balance_or_another_id_type_blocks_with_its_fix() {
        let found = differences(&shape(
            "id uuid NO,balance integer NO",
            "id",
            "balance >= 0",
        ));
        assert_eq!(
            found,
            vec![Difference {
                what: "balance is integer, not INT8".to_owned(),
                fix: Some("ALTER TABLE accounts ALTER COLUMN balance TYPE INT8".to_owned()),
                blocking: true,
            }]
        );
        let found = differences(&shape(
            "id bigint NO,balance bigint NO",
            "id",
            "balance >= 0",
        ));
        assert!(found[0].blocking && found[0].what == "id is bigint, not UUID");
    }

    #[test]
    fn missing_columns_block_and_have_no_fix() {
        let found = differences(&shape("id uuid NO", "id", ""));
        assert!(found
            .iter()
            .any(|d| d.blocking && d.fix.is_none() && d.what == "it has no column balance"));
        let found = differences(&shape("", "", ""));
        assert!(found.iter().any(|d| d.what == "it has no column id"));
    }

    #[test]
    fn a_missing_or_other_primary_key_is_named() {
        let none = differences(&shape("id uuid NO,balance bigint NO", "", "balance >= 0"));
        assert_eq!(
            none,
            vec![Difference {
                what: "it has no primary key".to_owned(),
                fix: Some("ALTER TABLE accounts ADD PRIMARY KEY (id)".to_owned()),
                blocking: false,
            }]
        );
        let other = differences(&shape(
            "id uuid NO,balance bigint NO",
            "id,balance",
            "balance >= 0",
        ));
        assert_eq!(other[0].what, "its primary key is (id, balance), not (id)");
        assert_eq!(other[0].fix, None);
    }

    #[test]
    fn column_types_of_several_words_are_read_whole() {
        let s = shape("id uuid NO,balance double precision YES", "id", "");
        assert_eq!(s.columns[1].data_type, "double precision");
        assert!(s.columns[1].nullable);
    }
}
