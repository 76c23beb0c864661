//! MQTT topic names, built from a prefix template that holds the device id.
//!
//! ```text
//! template   "edge/{device}"          (configurable; `{device}` exactly once)
//! topics     edge/<device>/up         agent → gateway   UplinkBatch
//!            edge/<device>/hello      agent → gateway   Hello
//!            edge/<device>/ack        gateway → agent   Ack
//!            edge/<device>/down       gateway → agent   Downlink
//! filters    edge/+/up, edge/+/hello  what the gateway subscribes to
//! ```
//!
//! The template adapts to the broker's isolation scheme (`tenant-a/{device}`,
//! `$aws/things/{device}/edge`, a Mosquitto `pattern` ACL on `edge/%c/#`). Rules, all
//! checked by [`Topics::new`]:
//! 1. `{device}` appears exactly once and is a whole topic level, so that `+` can
//!    stand in for it in subscription filters and ACL patterns.
//! 2. No MQTT wildcard (`+`, `#`), no NUL, no other `{` or `}` (a misspelt
//!    placeholder is an error, not a literal).
//! 3. No empty level (leading, trailing or doubled `/`).
//! 4. At most [`MAX_TEMPLATE_LEN`] bytes.
//!
//! Device ids must pass [`valid_device_id`], which
//! excludes `/`, `+` and `#`: a device id can never reach into another device's
//! topics or widen a filter.

use std::fmt;

use crate::config::valid_device_id;
use crate::model::DeviceId;

/// Longest accepted template, in bytes.
pub const MAX_TEMPLATE_LEN: usize = 512;

const PLACEHOLDER: &str = "{device}";

/// The four topics of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// Batches, agent → gateway.
    Up,
    /// Acks, gateway → agent.
    Ack,
    /// Hello replies, control and audiences, gateway → agent.
    Down,
    /// Hello on connect, agent → gateway.
    Hello,
}

impl TopicKind {
    pub const ALL: [TopicKind; 4] = [
        TopicKind::Up,
        TopicKind::Ack,
        TopicKind::Down,
        TopicKind::Hello,
    ];

    /// The last topic level.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::Up => "up",
            TopicKind::Ack => "ack",
            TopicKind::Down => "down",
            TopicKind::Hello => "hello",
        }
    }

    fn from_suffix(s: &str) -> Option<TopicKind> {
        TopicKind::ALL.into_iter().find(|k| k.suffix() == s)
    }
}

/// Why a template or a device id cannot make topics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The template does not contain `{device}`.
    #[error("topic template must contain `{{device}}`")]
    NoPlaceholder,
    /// The template contains `{device}` more than once.
    #[error("topic template must contain `{{device}}` only once")]
    ManyPlaceholders,
    /// `{device}` shares a topic level with other text (e.g. `edge/dev-{device}`).
    #[error("`{{device}}` must be a whole topic level, between `/`s")]
    PlaceholderNotALevel,
    /// The template contains an MQTT wildcard, a NUL, or a brace outside `{device}`.
    #[error("topic template must not contain `{0}`")]
    Forbidden(char),
    /// The template starts or ends with `/` or contains `//`.
    #[error("topic template must not have empty levels")]
    EmptyLevel,
    /// The template is longer than [`MAX_TEMPLATE_LEN`].
    #[error("topic template is {0} bytes, over the {MAX_TEMPLATE_LEN}-byte limit")]
    TooLong(usize),
    /// The device id is empty, too long, or has characters other than letters,
    /// digits, `-`, `_`, `.`, `:`.
    #[error("`{0}` is not a valid device id")]
    InvalidDevice(String),
}

/// A checked topic template: builds topic names and parses them back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Text before `{device}`: empty or ending in `/`.
    head: String,
    /// Text after `{device}`: empty or starting with `/`.
    tail: String,
}

impl Topics {
    pub const DEFAULT_TEMPLATE: &'static str = "edge/{device}";

    /// Checks `template` against the rules in the module docs.
    pub fn new(template: &str) -> Result<Topics, TopicError> {
        if template.len() > MAX_TEMPLATE_LEN {
            return Err(TopicError::TooLong(template.len()));
        }
        let (head, tail) = template
            .split_once(PLACEHOLDER)
            .ok_or(TopicError::NoPlaceholder)?;
        if tail.contains(PLACEHOLDER) {
            return Err(TopicError::ManyPlaceholders);
        }
        if let Some(c) = format!("{head}{tail}")
            .chars()
            .find(|c| matches!(c, '+' | '#' | '\0' | '{' | '}'))
        {
            return Err(TopicError::Forbidden(c));
        }
        if !(head.is_empty() || head.ends_with('/')) || !(tail.is_empty() || tail.starts_with('/'))
        {
            return Err(TopicError::PlaceholderNotALevel);
        }
        if template.starts_with('/') || template.ends_with('/') || template.contains("//") {
            return Err(TopicError::EmptyLevel);
        }
        Ok(Topics {
            head: head.to_owned(),
            tail: tail.to_owned(),
        })
    }

    /// The topic of `kind` for `device`.
    pub fn topic(&self, device: &DeviceId, kind: TopicKind) -> Result<String, TopicError> {
        if !valid_device_id(&device.0) {
            return Err(TopicError::InvalidDevice(device.0.clone()));
        }
        Ok(self.build(&device.0, kind))
    }

    /// All four topics of `device`.
    pub fn for_device(&self, device: &DeviceId) -> Result<DeviceTopics, TopicError> {
        Ok(DeviceTopics {
            up: self.topic(device, TopicKind::Up)?,
            ack: self.build(&device.0, TopicKind::Ack),
            down: self.build(&device.0, TopicKind::Down),
            hello: self.build(&device.0, TopicKind::Hello),
        })
    }

    /// The subscription filter matching `kind` for every device (`edge/+/up`).
    pub fn filter(&self, kind: TopicKind) -> String {
        self.build("+", kind)
    }

    /// Which device and which kind `topic` is, or `None` when it is not one of ours
    /// (other prefix, unknown suffix, invalid device id, extra levels).
    pub fn parse(&self, topic: &str) -> Option<(DeviceId, TopicKind)> {
        let rest = topic.strip_prefix(self.head.as_str())?;
        let (device, rest) = rest.split_at(rest.find('/')?);
        let suffix = rest.strip_prefix(self.tail.as_str())?.strip_prefix('/')?;
        let kind = TopicKind::from_suffix(suffix)?;
        valid_device_id(device).then(|| (DeviceId(device.to_owned()), kind))
    }

    fn build(&self, device: &str, kind: TopicKind) -> String {
        format!("{}{device}{}/{}", self.head, self.tail, kind.suffix())
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            head: "edge/".into(),
            tail: String::new(),
        }
    }
}

impl fmt::Display for Topics {
    /// The template the topics were built from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{PLACEHOLDER}{}", self.head, self.tail)
    }
}

/// The four topics of one device, built once (the agent's view).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTopics {
    up: String,
    ack: String,
    down: String,
    hello: String,
}

impl DeviceTopics {
    pub fn up(&self) -> &str {
        &self.up
    }

    pub fn ack(&self) -> &str {
        &self.ack
    }

    pub fn down(&self) -> &str {
        &self.down
    }

    pub fn hello(&self) -> &str {
        &self.hello
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId(s.into())
    }

    #[test]
    fn default_template_gives_the_documented_topics() {
        let t = Topics::default();
        assert_eq!(t, Topics::new(Topics::DEFAULT_TEMPLATE).unwrap());
        assert_eq!(t.to_string(), "edge/{device}");
        let d = t.for_device(&dev("roku-4a7f")).unwrap();
        assert_eq!(d.up(), "edge/roku-4a7f/up");
        assert_eq!(d.ack(), "edge/roku-4a7f/ack");
        assert_eq!(d.down(), "edge/roku-4a7f/down");
        assert_eq!(d.hello(), "edge/roku-4a7f/hello");
        assert_eq!(t.filter(TopicKind::Up), "edge/+/up");
    }

    #[test]
    fn placeholder_may_sit_anywhere_as_a_whole_level() {
        for (template, up) in [
            ("{device}", "d1/up"),
            ("{device}/edge", "d1/edge/up"),
            ("$aws/things/{device}/edge", "$aws/things/d1/edge/up"),
            ("tenant-a/site 1/{device}", "tenant-a/site 1/d1/up"),
        ] {
            let t = Topics::new(template).unwrap();
            assert_eq!(t.topic(&dev("d1"), TopicKind::Up).unwrap(), up);
            assert_eq!(t.to_string(), template);
            assert_eq!(t.parse(up), Some((dev("d1"), TopicKind::Up)));
        }
    }

    #[test]
    fn every_built_topic_parses_back() {
        let t = Topics::new("org/{device}/v1").unwrap();
        for kind in TopicKind::ALL {
            let topic = t.topic(&dev("a.b:c_d-9"), kind).unwrap();
            assert_eq!(t.parse(&topic), Some((dev("a.b:c_d-9"), kind)));
        }
    }

    #[test]
    fn foreign_topics_do_not_parse() {
        let t = Topics::new("edge/{device}").unwrap();
        for topic in [
            "",
            "edge",
            "edge/",
            "edge/d1",
            "edge/d1/",
            "edge/d1/upp",
            "edge/d1/up/x",
            "edge//up",
            "edge/+/up",
            "edge/#/up",
            "edge/d 1/up",
            "other/d1/up",
            "edgE/d1/up",
            "xedge/d1/up",
        ] {
            assert_eq!(t.parse(topic), None, "{topic:?}");
        }
        let long = format!("edge/{}/up", "a".repeat(129));
        assert_eq!(t.parse(&long), None);
    }

    #[test]
    fn topic_parse_requires_the_tail() {
        let t = Topics::new("edge/{device}/v1").unwrap();
        assert_eq!(t.parse("edge/d1/up"), None);
        assert_eq!(t.parse("edge/d1/v2/up"), None);
        assert_eq!(t.parse("edge/d1/v1/up"), Some((dev("d1"), TopicKind::Up)));
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (template, err) in [
            ("edge", TopicError::NoPlaceholder),
            ("edge/{Device}", TopicError::NoPlaceholder),
            ("{device}/{device}", TopicError::ManyPlaceholders),
            ("edge/+/{device}", TopicError::Forbidden('+')),
            ("edge/{device}/#", TopicError::Forbidden('#')),
            ("edge/{device}/{x}", TopicError::Forbidden('{')),
            ("edge/{device}}", TopicError::Forbidden('}')),
            ("edge/\0/{device}", TopicError::Forbidden('\0')),
            ("edge/dev-{device}", TopicError::PlaceholderNotALevel),
            ("edge/{device}x", TopicError::PlaceholderNotALevel),
            ("/edge/{device}", TopicError::EmptyLevel),
            ("edge/{device}/", TopicError::EmptyLevel),
            ("edge//{device}", TopicError::EmptyLevel),
        ] {
            assert_eq!(Topics::new(template), Err(err), "{template:?}");
        }
        let long = format!("{}/{{device}}", "a".repeat(MAX_TEMPLATE_LEN));
        assert_eq!(
            Topics::new(&long),
            Err(TopicError::TooLong(MAX_TEMPLATE_LEN + 9))
        );
    }

    #[test]
    fn invalid_device_ids_make_no_topics() {
        let t = Topics::default();
        for bad in ["", "a/b", "a+", "#", "a b", &"x".repeat(129)] {
            assert_eq!(
                t.topic(&dev(bad), TopicKind::Down),
                Err(TopicError::InvalidDevice(bad.to_owned()))
            );
            assert!(t.for_device(&dev(bad)).is_err());
        }
    }
}
