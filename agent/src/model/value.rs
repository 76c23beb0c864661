//! Property values: a JSON-like tree that both JSON and postcard can carry.
//!
//! postcard cannot decode `serde_json::Value` (it needs `deserialize_any`), so events
//! carry this enum instead. In human-readable formats (JSON) it looks like plain JSON;
//! in binary formats it is a tagged enum. Decoding refuses trees deeper than
//! [`MAX_DEPTH`], so a hostile frame or request cannot exhaust the stack.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// Keys and string values: inline up to 24 bytes (most of them), so a map is one
/// allocation rather than one per key and value.
pub type Str = compact_str::CompactString;

/// Deepest nesting of arrays/objects accepted when decoding a [`Value`].
pub const MAX_DEPTH: u32 = 32;

/// One property value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// Only for integers above `i64::MAX`.
    UInt(u64),
    Float(f64),
    String(Str),
    Array(Vec<Value>),
    Object(Map),
}

/// A string-keyed map of values, kept sorted by key (bytewise) with one entry per
/// key: a repeated key keeps its last value, as JSON parsers do.
///
/// Sorted because that is how every destination receives objects (the gateway writes
/// them as a `serde_json::Value` would, keys sorted): kept so from the start, a map
/// is written out by walking it, with no per-object sort or allocation per
/// destination, and looked up by binary search.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Map(Vec<(Str, Value)>);

impl Map {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// A map of `entries` in any order; of a repeated key the last value is kept.
    fn from_entries(mut entries: Vec<(Str, Value)>) -> Self {
        // Decoded maps are almost always sorted already (every encoder writes a `Map`
        // in order); checking is one pass.
        if entries.windows(2).any(|w| w[0].0 >= w[1].0) {
            // Stable: among equal keys the original order stays, so the last is kept.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut kept: Vec<(Str, Value)> = Vec::with_capacity(entries.len());
            for entry in entries {
                match kept.last_mut() {
                    Some(last) if last.0 == entry.0 => *last = entry,
                    _ => kept.push(entry),
                }
            }
            entries = kept;
        }
        Self(entries)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.position(key).ok().map(|at| &self.0[at].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        let at = self.position(key).ok()?;
        Some(&mut self.0[at].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn get_object(&self, key: &str) -> Option<&Map> {
        match self.get(key) {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        }
    }

    /// Sets `key`, replacing an existing entry.
    pub fn insert(&mut self, key: impl Into<Str>, value: Value) {
        let key = key.into();
        match self.position(&key) {
            Ok(at) => self.0[at].1 = value,
            Err(at) => self.0.insert(at, (key, value)),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let at = self.position(key).ok()?;
        Some(self.0.remove(at).1)
    }

    /// The entries, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Fills in keys from `defaults` that `self` lacks; nested objects merge recursively.
    pub fn merge_defaults(&mut self, defaults: &Map) {
        for (key, default) in defaults.iter() {
            match self.position(key) {
                Ok(at) => {
                    if let (Value::Object(mine), Value::Object(theirs)) =
                        (&mut self.0[at].1, default)
                    {
                        mine.merge_defaults(theirs);
                    }
                }
                Err(at) => self.0.insert(at, (key.into(), default.clone())),
            }
        }
    }
}

impl<K: Into<Str>> FromIterator<(K, Value)> for Map {
    fn from_iter<T: IntoIterator<Item = (K, Value)>>(iter: T) -> Self {
        Map::from_entries(iter.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.into())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s.into())
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Converts a TOML value from the config file (datetimes become strings).
    pub fn from_toml(value: &toml::Value) -> Value {
        match value {
            toml::Value::String(s) => Value::String(s.into()),
            toml::Value::Integer(i) => Value::Int(*i),
            toml::Value::Float(f) => Value::Float(*f),
            toml::Value::Boolean(b) => Value::Bool(*b),
            toml::Value::Datetime(d) => Value::String(d.to_string().into()),
            toml::Value::Array(a) => Value::Array(a.iter().map(Value::from_toml).collect()),
            toml::Value::Table(t) => Value::Object(
                t.iter()
                    .map(|(k, v)| (k.clone(), Value::from_toml(v)))
                    .collect(),
            ),
        }
    }
}

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Counts one level of nesting for the lifetime of the guard.
struct DepthGuard;

impl DepthGuard {
    fn enter<E: de::Error>() -> Result<Self, E> {
        DEPTH.with(|d| {
            let next = d.get() + 1;
            if next > MAX_DEPTH {
                return Err(E::custom(format_args!(
                    "values nested deeper than {MAX_DEPTH} levels"
                )));
            }
            d.set(next);
            Ok(DepthGuard)
        })
    }
}

impl Drop for DepthGuard {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// The binary (tagged) form. Variant order is part of the wire format: append only.
#[derive(Serialize)]
#[serde(rename = "Value")]
enum TaggedRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    String(&'a str),
    Array(&'a [Value]),
    Object(&'a Map),
}

#[derive(Deserialize)]
#[serde(rename = "Value")]
enum Tagged {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    String(Str),
    Array(Vec<Value>),
    Object(Map),
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return match self {
                Value::Null => s.serialize_unit(),
                Value::Bool(b) => s.serialize_bool(*b),
                Value::Int(i) => s.serialize_i64(*i),
                Value::UInt(u) => s.serialize_u64(*u),
                Value::Float(f) => s.serialize_f64(*f),
                Value::String(v) => s.serialize_str(v),
                Value::Array(a) => a.serialize(s),
                Value::Object(m) => m.serialize(s),
            };
        }
        let tagged = match self {
            Value::Null => TaggedRef::Null,
            Value::Bool(b) => TaggedRef::Bool(*b),
            Value::Int(i) => TaggedRef::Int(*i),
            Value::UInt(u) => TaggedRef::UInt(*u),
            Value::Float(f) => TaggedRef::Float(*f),
            Value::String(v) => TaggedRef::String(v),
            Value::Array(a) => TaggedRef::Array(a),
            Value::Object(m) => TaggedRef::Object(m),
        };
        tagged.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _guard = DepthGuard::enter::<D::Error>()?;
        if d.is_human_readable() {
            return d.deserialize_any(JsonVisitor);
        }
        Ok(match Tagged::deserialize(d)? {
            Tagged::Null => Value::Null,
            Tagged::Bool(b) => Value::Bool(b),
            Tagged::Int(i) => Value::Int(i),
            Tagged::UInt(u) => Value::UInt(u),
            Tagged::Float(f) => Value::Float(f),
            Tagged::String(s) => Value::String(s),
            Tagged::Array(a) => Value::Array(a),
            Tagged::Object(m) => Value::Object(m),
        })
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::UInt(v), Value::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v.into()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        MapVisitor.visit_map(map).map(Value::Object)
    }
}

impl Serialize for Map {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Map {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(MapVisitor)
    }
}

struct MapVisitor;

impl<'de> Visitor<'de> for MapVisitor {
    type Value = Map;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Map, A::Error> {
        let mut out = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
        while let Some((k, v)) = access.next_entry::<Str, Value>()? {
            out.push((k, v));
        }
        Ok(Map::from_entries(out))
    }

    fn visit_unit<E>(self) -> Result<Map, E> {
        Ok(Map::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::from_str(
            r#"{"a":1,"b":[true,null,2.5,"x"],"c":{"d":18446744073709551615,"e":-3}}"#,
        )
        .unwrap()
    }

    #[test]
    fn json_round_trip_keeps_shape() {
        let v = sample();
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(
            text,
            r#"{"a":1,"b":[true,null,2.5,"x"],"c":{"d":18446744073709551615,"e":-3}}"#
        );
    }

    #[test]
    fn postcard_round_trip_is_lossless() {
        let v = sample();
        let bytes = postcard::to_stdvec(&v).unwrap();
        let back: Value = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn deep_json_is_refused_not_overflowed() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let err = serde_json::from_str::<Value>(&deep).unwrap_err();
        assert!(err.to_string().contains("nested") || err.to_string().contains("recursion"));
    }

    #[test]
    fn deep_postcard_is_refused() {
        // Tag 6 = Array, length 1, repeated: a hand-made frame far deeper than MAX_DEPTH.
        let mut bytes = Vec::new();
        for _ in 0..10_000 {
            bytes.extend_from_slice(&[6, 1]);
        }
        bytes.push(0);
        assert!(postcard::from_bytes::<Value>(&bytes).is_err());
    }

    #[test]
    fn merge_defaults_fills_only_missing_keys() {
        let mut mine: Map = serde_json::from_str(r#"{"app":{"name":"x"},"os":"a"}"#).unwrap();
        let defaults: Map =
            serde_json::from_str(r#"{"app":{"name":"y","version":"1"},"locale":"en"}"#).unwrap();
        mine.merge_defaults(&defaults);
        assert_eq!(
            serde_json::to_string(&mine).unwrap(),
            r#"{"app":{"name":"x","version":"1"},"locale":"en","os":"a"}"#
        );
    }

    #[test]
    fn a_value_is_no_bigger_than_a_string_and_a_tag() {
        // The inline strings must not grow every map entry.
        assert!(std::mem::size_of::<Value>() <= 32);
    }

    #[test]
    fn keys_are_kept_sorted_and_a_repeated_key_keeps_its_last_value() {
        let mut m: Map = serde_json::from_str(r#"{"b":1,"a":2,"c":{"z":1,"y":2},"b":3}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"a":2,"b":3,"c":{"y":2,"z":1}}"#
        );
        m.insert("0", Value::Null);
        m.insert("bb", Value::Null);
        assert_eq!(m.remove("a"), Some(Value::Int(2)));
        let keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["0", "b", "bb", "c"]);
        assert_eq!(m.get("b"), Some(&Value::Int(3)));
        let from_pairs: Map = [
            ("y".to_owned(), Value::Int(1)),
            ("x".to_owned(), Value::Int(2)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            from_pairs.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["x", "y"]
        );
        // The binary form decodes to the same invariant whatever order it was sent in.
        let bytes = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Map>(&bytes).unwrap(), m);
    }
}
