//! From the config's `when` table to a checked [`Audience`]. Every error names the
//! audience and the path of the clause (`when.any[0].attribute.op`), and unknown keys
//! are errors, so a typo fails the start instead of silently matching nobody.

use std::fmt::Write as _;

use toml::Value as Toml;

use super::did::{fnv1a, DidClause, DidId, PropertyTest, MAX_OCCURRENCES};
use super::predicate::{Order, Scalar, Test, OPS};
use super::{Audience, ConditionError, Node, MAX_DEPTH};
use crate::config::AudienceConfig;

const CLAUSES: &str = "all, any, not, attribute, consent, ccpa_opt_out, did";
const KINDS: [&str; 7] = [
    "all",
    "any",
    "not",
    "attribute",
    "consent",
    "ccpa_opt_out",
    "did",
];
/// Keys that are options of some clause: a table holding only these lacks its kind.
const OPTIONS: [&str; 7] = [
    "op", "value", "type", "at_least", "within", "before", "where",
];

/// Compiles and checks one `[[audiences]]` entry.
pub fn compile(config: &AudienceConfig) -> Result<Audience, ConditionError> {
    let mut compiler = Compiler {
        audience: &config.name,
        path: String::from("when"),
        did: Vec::new(),
        attributes: Vec::new(),
    };
    let root = compiler.clause(&config.when, 0)?;
    Ok(Audience {
        name: config.name.clone(),
        description: config.description.clone(),
        root,
        did: compiler.did,
        attributes: compiler.attributes,
    })
}

struct Compiler<'a> {
    audience: &'a str,
    /// Path of the clause being compiled; segments are pushed and popped around
    /// children, so on error it names where the compiler stopped.
    path: String,
    did: Vec<DidClause>,
    attributes: Vec<String>,
}

type Table = toml::map::Map<String, Toml>;

impl Compiler<'_> {
    fn error(&self, key: Option<&str>, message: impl Into<String>) -> ConditionError {
        let mut path = self.path.clone();
        if let Some(key) = key {
            path.push('.');
            path.push_str(key);
        }
        ConditionError {
            audience: self.audience.to_owned(),
            path,
            message: message.into(),
        }
    }

    /// Runs `f` with `segment` appended to the path.
    fn nested<T>(
        &mut self,
        segment: std::fmt::Arguments<'_>,
        f: impl FnOnce(&mut Self) -> Result<T, ConditionError>,
    ) -> Result<T, ConditionError> {
        let len = self.path.len();
        // Writing to a String cannot fail.
        let _ = self.path.write_fmt(segment);
        let out = f(self)?;
        self.path.truncate(len);
        Ok(out)
    }

    fn clause(&mut self, value: &Toml, depth: usize) -> Result<Node, ConditionError> {
        if depth > MAX_DEPTH {
            return Err(self.error(
                None,
                format!("clauses nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        let Some(table) = value.as_table() else {
            return Err(self.error(
                None,
                format!(
                    "expected a clause (an inline table such as `{{ attribute = \"plan\", op = \"eq\", value = \"pro\" }}`), found {}",
                    value.type_str()
                ),
            ));
        };
        let kinds: Vec<&str> = KINDS
            .iter()
            .copied()
            .filter(|k| table.contains_key(*k))
            .collect();
        let kind = match kinds.as_slice() {
            [kind] => *kind,
            [] => {
                let message = match table.keys().find(|k| !OPTIONS.contains(&k.as_str())) {
                    Some(k) => format!("unknown clause `{k}` (expected {CLAUSES})"),
                    None => format!("the clause kind is missing (expected {CLAUSES})"),
                };
                return Err(self.error(None, message));
            }
            [first, second, ..] => {
                return Err(self.error(
                    None,
                    format!(
                        "`{first}` and `{second}` in one clause: write one clause per table and combine them with `all` or `any`"
                    ),
                ))
            }
        };
        self.nested(format_args!(".{kind}"), |c| match kind {
            "all" | "any" => c.list(table, kind, depth),
            "not" => {
                c.only(table, &["not"])?;
                let inner = c.clause(&table["not"], depth + 1)?;
                Ok(Node::Not(Box::new(inner)))
            }
            "attribute" => c.attribute(table),
            "consent" => {
                c.only(table, &["consent"])?;
                let purpose = c.name(table, "consent", "a consent purpose")?;
                Ok(Node::Consent(purpose))
            }
            "ccpa_opt_out" => {
                c.only(table, &["ccpa_opt_out"])?;
                match &table["ccpa_opt_out"] {
                    Toml::Boolean(b) => Ok(Node::CcpaOptOut(*b)),
                    other => Err(c.error(
                        None,
                        format!("expected true or false, found {}", other.type_str()),
                    )),
                }
            }
            _ => c.did(table),
        })
    }

    fn list(&mut self, table: &Table, kind: &str, depth: usize) -> Result<Node, ConditionError> {
        self.only(table, &[kind])?;
        let Some(items) = table[kind].as_array() else {
            return Err(self.error(
                None,
                format!(
                    "expected a list of clauses, found {}",
                    table[kind].type_str()
                ),
            ));
        };
        if items.is_empty() {
            return Err(self.error(None, "needs at least one clause"));
        }
        let mut nodes = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            nodes.push(self.nested(format_args!("[{i}]"), |c| c.clause(item, depth + 1))?);
        }
        Ok(if kind == "all" {
            Node::All(nodes)
        } else {
            Node::Any(nodes)
        })
    }

    /// Refuses keys other than `allowed` in the clause at the current path.
    fn only(&self, table: &Table, allowed: &[&str]) -> Result<(), ConditionError> {
        match table.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(self.error(
                None,
                format!("unknown key `{k}` (expected {})", allowed.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// A required non-empty string under `key`.
    fn name(&self, table: &Table, key: &str, what: &str) -> Result<Box<str>, ConditionError> {
        match table.get(key) {
            Some(Toml::String(s)) if !s.is_empty() => Ok(s.as_str().into()),
            Some(Toml::String(_)) => Err(self.error(Some(key), format!("{what} cannot be empty"))),
            Some(other) => Err(self.error(
                Some(key),
                format!("expected {what} (a string), found {}", other.type_str()),
            )),
            None => Err(self.error(Some(key), format!("{what} is required"))),
        }
    }

    fn attribute(&mut self, table: &Table) -> Result<Node, ConditionError> {
        self.only(table, &["attribute", "op", "value"])?;
        let name = self.name(table, "attribute", "an attribute name")?;
        let test = self.test(table)?;
        if !self.attributes.iter().any(|a| **a == *name) {
            self.attributes.push(name.to_string());
        }
        Ok(Node::Attribute { name, test })
    }

    /// The `op` and `value` keys of an attribute clause or a `where` item.
    fn test(&self, table: &Table) -> Result<Test, ConditionError> {
        let op = match table.get("op") {
            Some(Toml::String(op)) => op.as_str(),
            Some(other) => {
                return Err(self.error(
                    Some("op"),
                    format!("expected an op (a string), found {}", other.type_str()),
                ))
            }
            None => return Err(self.error(Some("op"), format!("an op is required ({OPS})"))),
        };
        let value = table.get("value");
        let need = |what: &str| match value {
            Some(v) => Ok(v),
            None => Err(self.error(Some("value"), format!("op `{op}` needs {what}"))),
        };
        let order = |order: Order| -> Result<Test, ConditionError> {
            match need("a number")? {
                Toml::Integer(i) => Ok(Test::Order(order, *i as f64)),
                Toml::Float(f) if f.is_finite() => Ok(Test::Order(order, *f)),
                other => Err(self.error(
                    Some("value"),
                    format!("op `{op}` compares numbers; found {}", describe(other)),
                )),
            }
        };
        let scalar = |v: &Toml| self.scalar(v, op);
        Ok(match op {
            "eq" => Test::Eq(scalar(need("a string, number or boolean")?)?),
            "ne" => Test::Ne(scalar(need("a string, number or boolean")?)?),
            "contains" => Test::Contains(scalar(need("a string, number or boolean")?)?),
            "gt" => order(Order::Gt)?,
            "gte" => order(Order::Gte)?,
            "lt" => order(Order::Lt)?,
            "lte" => order(Order::Lte)?,
            "exists" => {
                if value.is_some() {
                    return Err(self.error(Some("value"), "op `exists` takes no value"));
                }
                Test::Exists
            }
            "in" => match need("a list")? {
                Toml::Array(items) if !items.is_empty() => Test::In(
                    items
                        .iter()
                        .map(scalar)
                        .collect::<Result<Vec<_>, _>>()?
                        .into_boxed_slice(),
                ),
                other => {
                    return Err(self.error(
                        Some("value"),
                        format!(
                        "op `in` needs a non-empty list of strings, numbers or booleans; found {}",
                        describe(other)
                    ),
                    ))
                }
            },
            other => {
                return Err(self.error(Some("op"), format!("unknown op `{other}` (expected {OPS})")))
            }
        })
    }

    fn scalar(&self, value: &Toml, op: &str) -> Result<Scalar, ConditionError> {
        match value {
            Toml::String(s) => Ok(Scalar::Str(s.as_str().into())),
            Toml::Integer(i) => Ok(Scalar::Num(*i as f64)),
            Toml::Float(f) if f.is_finite() => Ok(Scalar::Num(*f)),
            Toml::Boolean(b) => Ok(Scalar::Bool(*b)),
            Toml::Datetime(d) => Ok(Scalar::Str(d.to_string().into())),
            other => Err(self.error(
                Some("value"),
                format!(
                    "op `{op}` compares with a string, number or boolean; found {}",
                    describe(other)
                ),
            )),
        }
    }

    fn did(&mut self, table: &Table) -> Result<Node, ConditionError> {
        self.only(
            table,
            &["did", "type", "at_least", "within", "before", "where"],
        )?;
        let event = self.name(table, "did", "an event name")?;
        let kind = match table.get("type") {
            None => None,
            Some(_) => Some(self.name(table, "type", "an event type")?),
        };
        let at_least = match table.get("at_least") {
            None => 1,
            Some(Toml::Integer(n)) if (1..=MAX_OCCURRENCES as i64).contains(n) => *n as u32,
            Some(other) => {
                return Err(self.error(
                    Some("at_least"),
                    format!(
                        "must be an integer from 1 to {MAX_OCCURRENCES}; found {}",
                        describe(other)
                    ),
                ))
            }
        };
        let within_ms = self.duration(table, "within")?;
        if within_ms == Some(0) {
            return Err(self.error(Some("within"), "must be above zero"));
        }
        let before_ms = self.duration(table, "before")?.unwrap_or(0);
        if let Some(within) = within_ms {
            if before_ms >= within {
                return Err(self.error(
                    Some("before"),
                    "must be shorter than `within`: no occurrence could ever be in the window",
                ));
            }
        }
        let filters = match table.get("where") {
            None => Vec::new(),
            Some(Toml::Array(items)) => {
                let mut filters = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let f = self.nested(format_args!(".where[{i}]"), |c| c.property_test(item))?;
                    filters.push(f);
                }
                filters
            }
            Some(other) => {
                return Err(self.error(
                    Some("where"),
                    format!(
                        "expected a list of `{{ property = .., op = .., value = .. }}`, found {}",
                        other.type_str()
                    ),
                ))
            }
        };
        let key = did_key(
            &event,
            kind.as_deref(),
            at_least,
            within_ms,
            before_ms,
            &filters,
        );
        let index = self.did.len();
        self.did.push(DidClause {
            index,
            id: DidId(fnv1a(&key)),
            key,
            event,
            kind,
            at_least,
            within_ms,
            before_ms,
            filters,
        });
        Ok(Node::Did(index))
    }

    fn property_test(&self, item: &Toml) -> Result<PropertyTest, ConditionError> {
        let Some(table) = item.as_table() else {
            return Err(self.error(
                None,
                format!(
                    "expected `{{ property = .., op = .., value = .. }}`, found {}",
                    item.type_str()
                ),
            ));
        };
        self.only(table, &["property", "op", "value"])?;
        Ok(PropertyTest {
            property: self.name(table, "property", "a property name")?,
            test: self.test(table)?,
        })
    }

    /// An optional humane duration (`"7d"`) under `key`, in ms.
    fn duration(&self, table: &Table, key: &str) -> Result<Option<i64>, ConditionError> {
        let text = match table.get(key) {
            None => return Ok(None),
            Some(Toml::String(text)) => text,
            Some(other) => {
                return Err(self.error(
                    Some(key),
                    format!(
                        "expected a duration such as \"7d\", found {}",
                        other.type_str()
                    ),
                ))
            }
        };
        let d = humantime::parse_duration(text)
            .map_err(|e| self.error(Some(key), format!("`{text}` is not a duration: {e}")))?;
        Ok(Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
    }
}

/// A TOML value's type and, for short scalars, the value itself.
fn describe(value: &Toml) -> String {
    match value {
        Toml::String(s) => format!("the string \"{s}\""),
        Toml::Integer(i) => format!("{i}"),
        Toml::Float(f) => format!("{f}"),
        Toml::Boolean(b) => format!("{b}"),
        other => other.type_str().to_owned(),
    }
}

/// The canonical text of a `did` clause's content: strings JSON-quoted so no name
/// can fake a separator. Its hash is the [`DidId`] states are stored under, so this
/// format must not change (a change forgets every stored occurrence).
fn did_key(
    event: &str,
    kind: Option<&str>,
    at_least: u32,
    within_ms: Option<i64>,
    before_ms: i64,
    filters: &[PropertyTest],
) -> String {
    let quote = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let mut key = format!(
        "did={}|type={}|at_least={at_least}|within_ms={}|before_ms={before_ms}|where=",
        quote(event),
        kind.map_or_else(|| "null".to_owned(), quote),
        within_ms.map_or_else(|| "null".to_owned(), |w| w.to_string()),
    );
    for (i, f) in filters.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(
            key,
            "{} {} {}",
            quote(&f.property),
            f.test.op(),
            f.test.value_json()
        );
    }
    key
}
