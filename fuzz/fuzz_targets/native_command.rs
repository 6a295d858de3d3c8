//! The native protocol (`switchboard.v1`) command decoder, as
//! `switchboard-server`'s `native::handle` runs it on every text frame of a
//! native connection: decode, then either answer the error under the id it
//! carries or check the channel name and run the command.
//!
//! Input: the payload of one text frame.
//!
//! Checks: no panic; an error's id and code are consistent; a decoded command
//! encodes to JSON that decodes to the same command (what the Rust SDK sends
//! is what the gateway reads).

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_proto::native::{self, decode_command, CommandBody, DecodeError, ErrorCode};

fn channel(body: &CommandBody) -> Option<&str> {
    match body {
        CommandBody::Subscribe { channel, .. }
        | CommandBody::Unsubscribe { channel }
        | CommandBody::Publish { channel, .. }
        | CommandBody::Presence { channel }
        | CommandBody::History { channel, .. } => Some(channel),
        CommandBody::Ping {}
        | CommandBody::Send { .. }
        | CommandBody::Refresh { .. }
        | CommandBody::Authenticate { .. } => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let cmd = match decode_command(data) {
        Ok(cmd) => cmd,
        Err(e) => {
            // What `native::handle` puts in the error reply.
            let _ = e.to_string();
            match &e {
                DecodeError::Malformed(_) => assert_eq!(e.id(), None),
                DecodeError::Unknown { cmd, .. } => {
                    assert!(cmd.chars().count() <= 64);
                    assert!(!native::COMMANDS.contains(&cmd.as_str()));
                    assert_eq!(e.code(), ErrorCode::UnknownCommand);
                }
                DecodeError::BadFields { cmd, .. } => {
                    assert!(native::COMMANDS.contains(&cmd.as_str()));
                    assert_eq!(e.code(), ErrorCode::BadCommand);
                }
            }
            return;
        }
    };
    assert!(native::COMMANDS.contains(&cmd.body.name()));
    if let Some(ch) = channel(&cmd.body) {
        if let Some(ns) = native::channel_namespace(ch) {
            assert!(ch.starts_with(ns) && ch.len() <= native::MAX_CHANNEL_LEN);
        }
    }
    let json = serde_json::to_vec(&cmd).expect("a command encodes");
    let again = decode_command(&json).unwrap_or_else(|e| {
        panic!(
            "{} does not decode again: {e}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(
        again,
        cmd,
        "round trip through {}",
        String::from_utf8_lossy(&json)
    );
});
