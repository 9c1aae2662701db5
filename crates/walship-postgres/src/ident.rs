//! SQL names: how walship names a table and quotes an identifier.
//!
//! Invariant: every identifier walship writes into SQL — statements it runs and fixes it prints
//! for an operator — goes through [`quote_ident`], always quoted, so a name is taken literally
//! (case, dots and quotes survive) and can never close the identifier early.

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    /// Schema (namespace).
    pub schema: String,
    /// Table.
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`). Quoting is not needed: names are
    /// taken literally, as they appear in `pg_class`.
    pub fn parse(s: &str) -> TableName {
        match s.split_once('.') {
            Some((schema, name)) => TableName {
                schema: schema.to_owned(),
                name: name.to_owned(),
            },
            None => TableName {
                schema: "public".to_owned(),
                name: s.to_owned(),
            },
        }
    }

    /// The name quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// `s` as an SQL identifier, always quoted (so case and special characters survive).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests;
