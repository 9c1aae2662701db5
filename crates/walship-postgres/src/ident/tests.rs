use super::*;

#[test]
fn table_names() {
    assert_eq!(TableName::parse("outbox").to_string(), "public.outbox");
    let t = TableName::parse("app.Out\"box");
    assert_eq!(t.schema, "app");
    assert_eq!(t.quoted(), "\"app\".\"Out\"\"box\"");
}
