//! What the HTTP fallbacks write: queued WebSocket frames taken apart
//! again, and written as Server-Sent Events or as long-poll batches; the
//! positions of a plain EventSource stream and their `Last-Event-ID`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use std::borrow::Cow;
use switchboard_proto::native::StreamPosition;

/// A queued frame, taken apart: the gateway's frames are unmasked and
/// uncompressed on a fallback connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unframed {
    /// A text frame's payload: a native push or reply.
    Text(Bytes),
    /// A close frame.
    Close { code: u16, reason: String },
    /// Anything else (a ping or pong): nothing to carry.
    Other,
}

/// Takes a frame the gateway encoded apart.
pub(crate) fn unframe(frame: &Bytes) -> Unframed {
    if frame.len() < 2 {
        return Unframed::Other;
    }
    let opcode = frame[0] & 0x0f;
    let (len, at) = match frame[1] & 0x7f {
        126 if frame.len() >= 4 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 if frame.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&frame[2..10]);
            (u64::from_be_bytes(n) as usize, 10)
        }
        n if n < 126 => (n as usize, 2),
        _ => return Unframed::Other,
    };
    let payload = frame.slice(at..(at + len).min(frame.len()));
    match opcode {
        0x1 => Unframed::Text(payload),
        0x8 => {
            let code = if payload.len() >= 2 {
                u16::from_be_bytes([payload[0], payload[1]])
            } else {
                switchboard_proto::ws::close::NO_STATUS
            };
            let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
            Unframed::Close { code, reason }
        }
        _ => Unframed::Other,
    }
}

/// The JSON of a close: `{"code":N,"reason":"…"}`.
pub(crate) fn close_json(code: u16, reason: &str) -> String {
    serde_json::json!({ "code": code, "reason": reason }).to_string()
}

/// Appends one SSE event: `id:` (when given), `event:` (when named) and
/// `data:` lines (one per line of `data`), and the blank line that ends it.
pub(crate) fn put_event(out: &mut BytesMut, id: Option<&str>, event: Option<&str>, data: &str) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    if let Some(event) = event {
        out.put_slice(b"event: ");
        out.put_slice(event.as_bytes());
        out.put_u8(b'\n');
    }
    // EventSource splits lines at CR, LF and CRLF, and joins `data:`
    // lines with LF.
    let mut rest = data;
    loop {
        let cut = rest.find(['\r', '\n']);
        out.put_slice(b"data: ");
        out.put_slice(&rest.as_bytes()[..cut.unwrap_or(rest.len())]);
        out.put_u8(b'\n');
        match cut {
            None => break,
            Some(i) => {
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
        }
    }
    out.put_u8(b'\n');
}

/// A heartbeat: an SSE comment line.
pub(crate) const HEARTBEAT: &[u8] = b":\n\n";

/// A long-poll answer's body: `{"cursor":N,"pushes":[…],"close":…}`.
pub(crate) fn batch(cursor: u64, pushes: &[Bytes], close: Option<&str>) -> Bytes {
    let len: usize = pushes.iter().map(|p| p.len() + 1).sum();
    let mut out = BytesMut::with_capacity(len + 64);
    out.put_slice(format!("{{\"cursor\":{cursor},\"pushes\":[").as_bytes());
    for (i, p) in pushes.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(p);
    }
    out.put_u8(b']');
    if let Some(close) = close {
        out.put_slice(b",\"close\":");
        out.put_slice(close.as_bytes());
    }
    out.put_u8(b'}');
    out.freeze()
}

/// The most channels one plain EventSource stream may name.
pub(crate) const MAX_PLAIN_CHANNELS: usize = 16;

/// A plain EventSource stream's channels, in URL order, with the position
/// the client has of each.
#[derive(Debug)]
pub(crate) struct Plain {
    channels: Vec<(String, Option<StreamPosition>)>,
    /// Subscribe replies still awaited (command ids are 1-based indexes).
    awaiting: usize,
}

/// What a native frame means on a plain stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PlainEvent {
    /// A channel message: its data, and the stream's new `id`.
    Message { data: String, id: String },
    /// Named event (`error`, `recovery-failed`, `subscribed`) with its data,
    /// and an `id` for `subscribed`.
    Named {
        event: &'static str,
        data: String,
        id: Option<String>,
    },
}

#[derive(Deserialize)]
struct NativeFrame<'a> {
    #[serde(default, borrow)]
    push: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default, borrow)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    binary: Option<Cow<'a, str>>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    result: Option<SubscribeAnswer>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct SubscribeAnswer {
    epoch: String,
    offset: u64,
    #[serde(default)]
    recovered: Option<bool>,
}

impl Plain {
    /// A stream of `channels`, whose client has the positions of
    /// `last_event_id` (its previous stream's last `id`).
    pub(crate) fn new(channels: Vec<String>, last_event_id: Option<&str>) -> Self {
        let mut ids = last_event_id.map(|s| s.split(','));
        let channels: Vec<_> = channels
            .into_iter()
            .map(|c| {
                let pos = ids
                    .as_mut()
                    .and_then(Iterator::next)
                    .and_then(parse_position);
                (c, pos)
            })
            .collect();
        Self {
            awaiting: channels.len(),
            channels,
        }
    }

    /// The `subscribe` commands that open the stream, one per channel,
    /// recovering from the client's positions.
    pub(crate) fn subscribe_commands(&self) -> Vec<Vec<u8>> {
        self.channels
            .iter()
            .enumerate()
            .map(|(i, (channel, since))| {
                serde_json::to_vec(&serde_json::json!({
                    "id": i + 1,
                    "cmd": "subscribe",
                    "channel": channel,
                    "since": since,
                }))
                .expect("commands serialize")
            })
            .collect()
    }

    /// The stream's `id`: every channel's position, in URL order.
    pub(crate) fn id(&self) -> String {
        let mut id = String::new();
        for (i, (_, pos)) in self.channels.iter().enumerate() {
            if i > 0 {
                id.push(',');
            }
            if let Some(p) = pos {
                id.push_str(&p.epoch);
                id.push(':');
                id.push_str(&p.offset.to_string());
            }
        }
        id
    }

    /// What a native frame (a push or a reply) means to the client, if
    /// anything; positions follow the channel messages.
    pub(crate) fn on_frame(&mut self, json: &[u8]) -> Vec<PlainEvent> {
        let Ok(frame) = serde_json::from_slice::<NativeFrame<'_>>(json) else {
            return Vec::new();
        };
        if frame.push.as_deref() == Some("message") {
            let (Some(channel), Some(offset), Some(epoch)) =
                (frame.channel, frame.offset, frame.epoch)
            else {
                return Vec::new();
            };
            let data = match (frame.text, frame.binary) {
                (Some(t), _) => t.into_owned(),
                (None, Some(b)) => b.into_owned(),
                (None, None) => String::new(),
            };
            if let Some((_, pos)) = self.channels.iter_mut().find(|(c, _)| *c == channel) {
                *pos = Some(StreamPosition {
                    offset,
                    epoch: epoch.into_owned(),
                });
            }
            return vec![PlainEvent::Message {
                data,
                id: self.id(),
            }];
        }
        if frame.push.is_some() {
            return Vec::new();
        }
        // A reply: to one of the opening subscribes (ids are 1-based).
        let Some(i) = frame
            .id
            .and_then(|id| usize::try_from(id).ok())
            .filter(|&id| id >= 1 && id <= self.channels.len())
            .map(|id| id - 1)
        else {
            return Vec::new();
        };
        let mut events = Vec::new();
        let (channel, pos) = &mut self.channels[i];
        if let Some(answer) = frame.result {
            let had_since = pos.is_some();
            if !had_since || answer.recovered == Some(false) {
                *pos = Some(StreamPosition {
                    offset: answer.offset,
                    epoch: answer.epoch.clone(),
                });
            }
            if had_since && answer.recovered == Some(false) {
                events.push(PlainEvent::Named {
                    event: "recovery-failed",
                    data: serde_json::json!({
                        "channel": channel,
                        "epoch": answer.epoch,
                        "offset": answer.offset,
                    })
                    .to_string(),
                    id: None,
                });
            }
        } else if let Some(error) = frame.error {
            events.push(PlainEvent::Named {
                event: "error",
                data: serde_json::json!({
                    "channel": channel,
                    "code": error.get("code"),
                    "message": error.get("message"),
                })
                .to_string(),
                id: None,
            });
        } else {
            return Vec::new();
        }
        self.awaiting = self.awaiting.saturating_sub(1);
        if self.awaiting == 0 {
            let channels: Vec<&str> = self.channels.iter().map(|(c, _)| c.as_str()).collect();
            events.push(PlainEvent::Named {
                event: "subscribed",
                data: serde_json::json!({ "channels": channels }).to_string(),
                id: Some(self.id()),
            });
        }
        events
    }
}

/// `EPOCH:OFFSET` (empty: no position).
fn parse_position(s: &str) -> Option<StreamPosition> {
    let (epoch, offset) = s.trim().rsplit_once(':')?;
    Some(StreamPosition {
        offset: offset.parse().ok()?,
        epoch: epoch.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::ws::frame::{encode_close, encode_frame, OpCode};

    #[test]
    fn frames_come_apart() {
        let small = encode_frame(OpCode::Text, b"{\"a\":1}");
        assert_eq!(
            unframe(&small),
            Unframed::Text(Bytes::from_static(b"{\"a\":1}"))
        );
        let big = vec![b'x'; 70_000];
        assert_eq!(
            unframe(&encode_frame(OpCode::Text, &big)),
            Unframed::Text(Bytes::from(big))
        );
        let mid = vec![b'y'; 300];
        assert_eq!(
            unframe(&encode_frame(OpCode::Text, &mid)),
            Unframed::Text(Bytes::from(mid))
        );
        assert_eq!(
            unframe(&encode_close(4004, "token expired")),
            Unframed::Close {
                code: 4004,
                reason: "token expired".into()
            }
        );
        assert_eq!(unframe(&encode_frame(OpCode::Ping, b"")), Unframed::Other);
    }

    #[test]
    fn events_split_lines_as_eventsource_joins_them() {
        let mut out = BytesMut::new();
        put_event(&mut out, Some("7"), None, "a\nb\r\nc\rd");
        assert_eq!(&out[..], b"id: 7\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
        out.clear();
        put_event(&mut out, None, Some("close"), "");
        assert_eq!(&out[..], b"event: close\ndata: \n\n");
    }

    #[test]
    fn batches_are_json() {
        let b = batch(
            3,
            &[Bytes::from_static(b"{\"x\":1}"), Bytes::from_static(b"{}")],
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v, serde_json::json!({"cursor":3,"pushes":[{"x":1},{}]}));
        let b = batch(4, &[], Some(&close_json(1000, "bye")));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cursor":4,"pushes":[],"close":{"code":1000,"reason":"bye"}})
        );
    }

    #[test]
    fn plain_streams_track_positions_and_recover() {
        let mut p = Plain::new(vec!["a:x".into(), "b:y".into()], Some("e1:5,"));
        let cmds = p.subscribe_commands();
        let first: serde_json::Value = serde_json::from_slice(&cmds[0]).unwrap();
        assert_eq!(first["since"], serde_json::json!({"offset":5,"epoch":"e1"}));
        let second: serde_json::Value = serde_json::from_slice(&cmds[1]).unwrap();
        assert_eq!(second["since"], serde_json::Value::Null);
        // A recovered message, then the reply.
        let ev = p.on_frame(
            br#"{"push":"message","channel":"a:x","offset":6,"epoch":"e1","text":"hi\nthere"}"#,
        );
        assert_eq!(
            ev,
            vec![PlainEvent::Message {
                data: "hi\nthere".into(),
                id: "e1:6,".into()
            }]
        );
        assert!(p
            .on_frame(br#"{"id":1,"result":{"epoch":"e1","offset":6,"recovered":true,"missed":1}}"#)
            .is_empty());
        // The second channel is refused.
        let ev = p.on_frame(br#"{"id":2,"error":{"code":"permission_denied","message":"no"}}"#);
        assert_eq!(ev.len(), 2);
        assert!(matches!(&ev[0], PlainEvent::Named { event: "error", .. }));
        assert_eq!(
            ev[1],
            PlainEvent::Named {
                event: "subscribed",
                data: r#"{"channels":["a:x","b:y"]}"#.into(),
                id: Some("e1:6,".into())
            }
        );
        // Other pushes mean nothing here.
        assert!(p.on_frame(br#"{"push":"join","channel":"a:x"}"#).is_empty());
    }

    #[test]
    fn a_failed_recovery_says_so_and_goes_on_from_now() {
        let mut p = Plain::new(vec!["a:x".into()], Some("old:3"));
        let ev = p.on_frame(br#"{"id":1,"result":{"epoch":"new","offset":9,"recovered":false}}"#);
        assert_eq!(ev.len(), 2);
        assert_eq!(
            ev[0],
            PlainEvent::Named {
                event: "recovery-failed",
                data: r#"{"channel":"a:x","epoch":"new","offset":9}"#.into(),
                id: None
            }
        );
        assert_eq!(p.id(), "new:9");
    }
}
