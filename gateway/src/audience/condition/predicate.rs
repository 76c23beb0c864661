//! The value tests shared by `attribute` clauses and a `did` clause's `where` list:
//! `eq`, `ne`, `gt`, `gte`, `lt`, `lte`, `exists`, `contains`, `in`.
//!
//! Numbers compare as numbers whatever their encoding (`Int`, `UInt`, `Float`, or a
//! string that parses as one, as apps often send `"9.99"`), strings exactly, booleans
//! as booleans. Evaluation allocates nothing.

use std::cmp::Ordering;

use edge_agent::model::Value;

/// A constant from the config a value is compared with.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Str(Box<str>),
    /// Always finite (checked at compile).
    Num(f64),
    Bool(bool),
}

/// An order test on numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    Gt,
    Gte,
    Lt,
    Lte,
}

/// A compiled test of one value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Test {
    Eq(Scalar),
    /// Exactly `not eq`: a missing value is "not equal".
    Ne(Scalar),
    Order(Order, f64),
    /// Present and not null.
    Exists,
    /// A string holding the (string) scalar, or a list holding an element equal to it.
    Contains(Scalar),
    /// Equal to one of the scalars (never empty).
    In(Box<[Scalar]>),
}

/// Names of the ops, as written in the config.
pub(super) const OPS: &str = "eq, ne, gt, gte, lt, lte, exists, contains, in";

impl Test {
    /// Whether `value` (`None`: absent) passes.
    pub(super) fn holds(&self, value: Option<&Value>) -> bool {
        match self {
            Test::Ne(s) => !value.is_some_and(|v| equals(v, s)),
            Test::Exists => value.is_some_and(|v| *v != Value::Null),
            _ => value.is_some_and(|v| self.holds_present(v)),
        }
    }

    fn holds_present(&self, value: &Value) -> bool {
        match self {
            Test::Eq(s) => equals(value, s),
            Test::Ne(s) => !equals(value, s),
            Test::Order(order, bound) => number(value)
                .and_then(|n| n.partial_cmp(bound))
                .is_some_and(|o| match order {
                    Order::Gt => o == Ordering::Greater,
                    Order::Gte => o != Ordering::Less,
                    Order::Lt => o == Ordering::Less,
                    Order::Lte => o != Ordering::Greater,
                }),
            Test::Exists => *value != Value::Null,
            Test::Contains(s) => match (value, s) {
                (Value::String(text), Scalar::Str(part)) => text.contains(&**part),
                (Value::Array(items), _) => items.iter().any(|item| equals(item, s)),
                _ => false,
            },
            Test::In(options) => options.iter().any(|s| equals(value, s)),
        }
    }

    /// The op's config name.
    pub(super) fn op(&self) -> &'static str {
        match self {
            Test::Eq(_) => "eq",
            Test::Ne(_) => "ne",
            Test::Order(Order::Gt, _) => "gt",
            Test::Order(Order::Gte, _) => "gte",
            Test::Order(Order::Lt, _) => "lt",
            Test::Order(Order::Lte, _) => "lte",
            Test::Exists => "exists",
            Test::Contains(_) => "contains",
            Test::In(_) => "in",
        }
    }

    /// The configured value, for explanations and clause keys (`null` for `exists`).
    pub(super) fn value_json(&self) -> serde_json::Value {
        match self {
            Test::Eq(s) | Test::Ne(s) | Test::Contains(s) => s.to_json(),
            Test::Order(_, n) => number_json(*n),
            Test::Exists => serde_json::Value::Null,
            Test::In(options) => options.iter().map(Scalar::to_json).collect(),
        }
    }
}

impl Scalar {
    pub(super) fn to_json(&self) -> serde_json::Value {
        match self {
            Scalar::Str(s) => serde_json::Value::String(s.to_string()),
            Scalar::Num(n) => number_json(*n),
            Scalar::Bool(b) => serde_json::Value::Bool(*b),
        }
    }
}

/// Integral numbers print as integers (`5`, not `5.0`).
fn number_json(n: f64) -> serde_json::Value {
    // Exact for |n| < 2^53, the range where f64 holds every integer.
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

fn equals(value: &Value, scalar: &Scalar) -> bool {
    match scalar {
        Scalar::Str(s) => value.as_str() == Some(&**s),
        Scalar::Num(n) => number(value) == Some(*n),
        Scalar::Bool(b) => *value == Value::Bool(*b),
    }
}

/// A value as a number: numbers, and strings that parse as one (`"9.99"`).
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(i) => Some(*i as f64),
        Value::UInt(u) => Some(*u as f64),
        Value::Float(f) if f.is_finite() => Some(*f),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}
