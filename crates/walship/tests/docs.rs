//! The documentation against the code, with no servers: the configuration reference
//! (`docs/src/configuration/reference.md`) against the configuration structs, and every TOML
//! example the README and the book show against the loader.
//!
//! Invariant: a key the configuration accepts and the reference does not list, a listed key
//! that does not exist, a documented default that differs from the one walship uses, an
//! environment name that does not set its key, or an example that does not load fails here.
//!
//! The structs are asked directly rather than through a copy of their field lists: the keys a
//! section accepts are the ones its `deny_unknown_fields` error names for a misspelt key, and a
//! default is right when a file that sets the key to it loads to the same configuration as a
//! file that leaves the key out.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use walship::config::deployment::Deployment;

const REFERENCE: &str = include_str!("../../../docs/src/configuration/reference.md");
const README: &str = include_str!("../../../README.md");

/// The sections of a single-pipeline file (`Config`) and those only a file with pipelines has.
const CONFIG_SECTIONS: [&str; 5] = ["postgres", "outbox", "kafka", "run", "metrics"];
const BOGUS: &str = "zz_not_a_key";

/// One row of the reference: section, key, default cell, environment cell.
#[derive(Debug)]
struct Row {
    section: String,
    key: String,
    default: Default,
    env: String,
}

#[derive(Debug)]
enum Default {
    /// A TOML value, and its text as the reference writes it.
    Value(toml::Value, String),
    Required,
    Unset,
    Refused,
}

/// The rows of every `` ## `[section]` `` table of the reference.
fn reference_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    let mut section: Option<String> = None;
    for line in REFERENCE.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h
                .trim()
                .strip_prefix("`[")
                .and_then(|s| s.strip_suffix("]`"))
                .filter(|s| !s.starts_with('['))
                .map(str::to_owned);
            continue;
        }
        let Some(section) = &section else { continue };
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert!(cells.len() >= 4, "reference row with too few cells: {line}");
        let code = |cell: &str| -> Option<String> {
            cell.strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .map(str::to_owned)
        };
        let key = code(cells[0]).unwrap_or_else(|| panic!("key not in backticks: {line}"));
        let default = match cells[1] {
            "required" => Default::Required,
            "unset" => Default::Unset,
            "refused" => Default::Refused,
            cell => {
                let literal = code(cell).unwrap_or_else(|| {
                    panic!("default of {section}.{key} is neither `a TOML value` nor required/unset/refused: {cell}")
                });
                Default::Value(toml_value(&literal), literal)
            }
        };
        let env = code(cells[2]).unwrap_or_else(|| panic!("environment not in backticks: {line}"));
        rows.push(Row {
            section: section.clone(),
            key,
            default,
            env,
        });
    }
    rows
}

fn toml_value(literal: &str) -> toml::Value {
    let mut t: toml::Table = toml::from_str(&format!("v = {literal}"))
        .unwrap_or_else(|e| panic!("{literal:?} is not a TOML value: {e}"));
    t.remove("v").unwrap()
}

/// The smallest file walship accepts: a single pipeline, or with `[cluster]` a file with one
/// named pipeline.
fn minimal(section: &str) -> toml::Table {
    let text = if section == "cluster" {
        "[kafka]\nbrokers = \"kafka:9092\"\n[cluster]\ngroup = \"g\"\n\
         [[pipelines]]\nname = \"p\"\npostgres = { url = \"postgres://walship@db/app\" }\n"
    } else {
        "[postgres]\nurl = \"postgres://walship@db/app\"\n[kafka]\nbrokers = \"kafka:9092\"\n"
    };
    toml::from_str(text).unwrap()
}

fn load(table: &toml::Table, env: &[(&str, String)]) -> Result<String, String> {
    let text = toml::to_string(table).unwrap();
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone()));
    Deployment::from_toml(&text, env, "test")
        .map(|d| format!("{d:?}"))
        .map_err(|e| e.0)
}

fn with_key(section: &str, key: &str, value: toml::Value) -> toml::Table {
    let mut t = minimal(section);
    let s = t
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    s.as_table_mut().unwrap().insert(key.to_owned(), value);
    t
}

fn without_key(section: &str, key: &str) -> toml::Table {
    let mut t = minimal(section);
    if let Some(toml::Value::Table(s)) = t.get_mut(section) {
        s.remove(key);
    }
    t
}

/// The names in serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`").
fn expected_fields(error: &str) -> BTreeSet<String> {
    let (_, list) = error
        .split_once("expected")
        .unwrap_or_else(|| panic!("not an unknown-field error: {error}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The keys `section` accepts, from the error a misspelt key gets.
fn accepted_keys(section: &str) -> BTreeSet<String> {
    let table = with_key(section, BOGUS, toml::Value::Integer(1));
    let error = load(&table, &[]).expect_err("a misspelt key is refused");
    assert!(
        error.contains(BOGUS),
        "the error for {section}.{BOGUS} does not name it: {error}"
    );
    expected_fields(&error)
}

fn env_name(section: &str, key: &str) -> String {
    format!(
        "WALSHIP_{}__{}",
        section.to_ascii_uppercase(),
        key.to_ascii_uppercase()
    )
}

#[test]
fn the_reference_lists_every_section_a_file_can_have() {
    let mut top = minimal("postgres");
    top.insert(BOGUS.into(), toml::Value::Integer(1));
    let error = load(&top, &[]).expect_err("an unknown section is refused");
    let mut sections = expected_fields(&error);
    // Read by the loader of files with several pipelines before the rest.
    sections.extend(["cluster".to_owned(), "pipelines".to_owned()]);
    let documented: BTreeSet<String> = REFERENCE
        .lines()
        .filter_map(|l| l.strip_prefix("## `["))
        .map(|s| s.trim_matches(['[', ']', '`']))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        documented, sections,
        "the reference's sections (left) differ from the configuration's (right)"
    );
    assert_eq!(
        expected_fields(&error),
        CONFIG_SECTIONS.iter().map(|s| (*s).to_owned()).collect(),
        "Config has other sections than this test knows"
    );
}

#[test]
fn the_reference_lists_exactly_the_keys_the_configuration_accepts() {
    let rows = reference_rows();
    let mut documented: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for row in &rows {
        let new = documented
            .entry(row.section.as_str())
            .or_default()
            .insert(row.key.clone());
        assert!(new, "{}.{} is listed twice", row.section, row.key);
    }
    for section in CONFIG_SECTIONS.iter().chain(&["cluster"]) {
        let accepted = accepted_keys(section);
        let listed = documented.get(section).cloned().unwrap_or_default();
        let missing: Vec<_> = accepted.difference(&listed).collect();
        let unknown: Vec<_> = listed.difference(&accepted).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "[{section}]: accepted but not in the reference: {missing:?}; in the reference but \
             not accepted: {unknown:?}"
        );
    }
    assert_eq!(
        documented.len(),
        CONFIG_SECTIONS.len() + 1,
        "a table for a section walship does not have"
    );
}

#[test]
fn the_documented_defaults_are_the_ones_walship_uses() {
    for row in reference_rows() {
        let (section, key) = (row.section.as_str(), row.key.as_str());
        let base = load(&minimal(section), &[]).unwrap();
        match &row.default {
            Default::Value(value, _) => {
                let left_out = load(&without_key(section, key), &[]).unwrap_or_else(|e| {
                    panic!(
                        "{section}.{key} has a documented default, but leaving it out fails: {e}"
                    )
                });
                let set = load(&with_key(section, key, value.clone()), &[])
                    .unwrap_or_else(|e| panic!("{section}.{key} = {value}: {e}"));
                assert_eq!(
                    set, left_out,
                    "{section}.{key}: the documented default {value} is not what walship uses \
                     when the key is left out"
                );
            }
            Default::Required => {
                let error = load(&without_key(section, key), &[])
                    .expect_err(&format!("{section}.{key} is documented as required"));
                assert!(
                    error.contains(&format!("missing field `{key}`")),
                    "{section}.{key}: {error}"
                );
            }
            Default::Unset => assert!(
                base.contains(&format!("{key}: None")),
                "{section}.{key} is documented as unset by default, but the loaded \
                 configuration has a value: {base}"
            ),
            Default::Refused => {
                load(
                    &with_key(section, key, toml::Value::String("x".into())),
                    &[],
                )
                .expect_err(&format!("{section}.{key} is documented as refused"));
            }
        }
    }
}

#[test]
fn the_documented_environment_names_set_their_keys() {
    for row in reference_rows() {
        let (section, key) = (row.section.as_str(), row.key.as_str());
        assert_eq!(
            row.env,
            env_name(section, key),
            "{section}.{key}: environment name"
        );
        let given = match &row.default {
            // The default, as the environment would give it: a TOML literal.
            Default::Value(_, literal) => Some((without_key(section, key), literal.clone())),
            // The minimal file's own value, taken out of the file.
            Default::Required => {
                let value = minimal(section)[section][key].clone();
                let toml::Value::String(s) = value else {
                    panic!("{section}.{key}: a required value that is not text")
                };
                Some((without_key(section, key), s))
            }
            Default::Unset | Default::Refused => None,
        };
        let Some((table, value)) = given else {
            continue;
        };
        let from_env = load(&table, &[(row.env.as_str(), value.clone())])
            .unwrap_or_else(|e| panic!("{}={value}: {e}", row.env));
        // The same value in the file: the default, or the minimal file's required value.
        let in_file = match &row.default {
            Default::Value(value, _) => with_key(section, key, value.clone()),
            _ => minimal(section),
        };
        assert_eq!(
            from_env,
            load(&in_file, &[]).unwrap(),
            "{}={value} does not set {section}.{key}",
            row.env
        );
    }
}

#[test]
fn every_toml_example_of_the_book_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            Deployment::from_toml(&text, std::iter::empty(), &path.display().to_string())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            loaded += 1;
        }
    }
    assert!(loaded >= 5, "only {loaded} examples in {}", dir.display());
}

#[test]
fn the_readme_quick_start_configuration_loads() {
    let marker = "<!-- quickstart: file walship.toml -->";
    let after = README
        .split_once(marker)
        .unwrap_or_else(|| panic!("the README has no {marker}"))
        .1;
    let block = after
        .trim_start()
        .strip_prefix("```toml\n")
        .and_then(|b| b.split_once("\n```").map(|(b, _)| b))
        .expect("a toml block follows the marker");
    let d = Deployment::from_toml(block, std::iter::empty(), "README quick start")
        .unwrap_or_else(|e| panic!("{e}"));
    let config = &d.pipelines[0].config;
    assert_eq!(config.postgres.slot_history_table, "walship.walship_slots");
    assert!(!config.postgres.create_publication);
}
