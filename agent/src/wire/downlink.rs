//! What the gateway sends a device on `…/down`: hello replies, control commands and
//! audience membership.
//!
//! ```text
//! Downlink = varint tag + variant:
//!   0 HelloReply   gateway_time_ms zigzag i64, audiences_version varint u64
//!   1 Control      Control
//!   2 Audiences    AudienceUpdate
//!
//! Control = varint tag + variant:
//!   0 PurgeUser    user_id String
//!   1 SetConsent   subject String
//!                  purposes varint n, n × (purpose String, granted bool)
//!                  ccpa_opt_out Option<bool>: 00 | 01 00 | 01 01
//!                  at_ms zigzag i64
//!
//! AudienceUpdate = version varint u64, user_id String, audiences varint n × String
//!
//! e.g. Control(PurgeUser { "u1" }) as a frame:  01 00  01  00  02 75 31
//! ```
//!
//! Variants are tagged by position: append only. An agent cannot decode a tag it does
//! not know, so a new variant ships to agents before any gateway sends it.

use serde::{Deserialize, Serialize};

/// One message on a device's downlink topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Downlink {
    /// Answer to [`Hello`](super::Hello), sent before any update it implies.
    HelloReply {
        /// Gateway wall clock at send, ms since the epoch.
        gateway_time_ms: i64,
        /// Newest audience version the gateway has for this device; when it is above
        /// the agent's, [`Downlink::Audiences`] updates follow.
        audiences_version: u64,
    },
    Control(Control),
    Audiences(AudienceUpdate),
}

/// A command the device must carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Delete everything held for this user (spool, audiences, consent): a data
    /// subject request erased upstream.
    PurgeUser { user_id: String },
    /// Consent decided on the server for `subject` (a user, anonymous or device id).
    SetConsent {
        subject: String,
        /// `(purpose, granted)`; purposes not listed keep their current state.
        purposes: Vec<(String, bool)>,
        /// CCPA "do not sell/share"; `None` leaves it unchanged.
        ccpa_opt_out: Option<bool>,
        /// When the decision was made, ms since the epoch; an older decision than the
        /// one the device holds is ignored.
        at_ms: i64,
    },
}

/// A user's audience membership as of `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudienceUpdate {
    /// Increases with every membership change the gateway sends this device.
    pub version: u64,
    pub user_id: String,
    /// Every audience the user is in at `version` (a full set, not a delta).
    pub audiences: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_downlink, encode_downlink, Compression, DEFAULT_MAX_FRAME};

    #[test]
    fn purge_layout_matches_the_drawing() {
        let msg = Downlink::Control(Control::PurgeUser {
            user_id: "u1".into(),
        });
        let f = encode_downlink(&msg, Compression::None).unwrap();
        assert_eq!(f, [1, 0, 1, 0, 2, b'u', b'1']);
        assert_eq!(decode_downlink(&f, DEFAULT_MAX_FRAME).unwrap(), msg);
    }

    #[test]
    fn consent_option_encodes_unset_and_both_values() {
        for (ccpa, tail) in [
            (None, &[0u8][..]),
            (Some(false), &[1, 0]),
            (Some(true), &[1, 1]),
        ] {
            let msg = Downlink::Control(Control::SetConsent {
                subject: "s".into(),
                purposes: vec![("ads".into(), false)],
                ccpa_opt_out: ccpa,
                at_ms: 1,
            });
            let f = encode_downlink(&msg, Compression::None).unwrap();
            let mut expected = vec![1, 0, 1, 1, 1, b's', 1, 3, b'a', b'd', b's', 0];
            expected.extend_from_slice(tail);
            expected.push(2);
            assert_eq!(f, expected);
            assert_eq!(decode_downlink(&f, DEFAULT_MAX_FRAME).unwrap(), msg);
        }
    }

    #[test]
    fn bool_other_than_zero_or_one_is_malformed() {
        // SetConsent with one purpose whose `granted` byte is 2.
        let f = [1, 0, 1, 1, 1, b's', 1, 1, b'a', 2, 0, 2];
        assert!(matches!(
            decode_downlink(&f, DEFAULT_MAX_FRAME),
            Err(crate::wire::WireError::Malformed(_))
        ));
    }
}
