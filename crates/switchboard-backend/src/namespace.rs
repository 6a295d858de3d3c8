//! Channel namespaces: the options a channel's name prefix gives it
//! (history, presence, who may publish and subscribe), as configured with
//! `--namespace NAME:OPTION,...`. Backends read them to size channel logs.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Longest duration a namespace option takes.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A channel namespace: the rules of every channel named `<name>:...`.
///
/// Written `NAME[:OPTION,...]`, e.g.
/// `chat:history-size=100,history-ttl=10m,presence,join-leave,publish,subscribe`.
/// Options: `history-size=N` (messages kept per channel, default 0: none),
/// `history-ttl=DURATION` (how long they are kept, default 10m), `presence`
/// (track who is subscribed), `join-leave` (push joins and leaves to
/// subscribers; needs `presence`), `publish` (clients may publish),
/// `subscribe` (clients may subscribe themselves; otherwise only the origin
/// subscribes them), `publish-to-origin` (each client publish is first sent
/// to the origin as a `publish` event, which accepts or refuses it; needs
/// `publish`), `subscribe-to-origin` (a client subscribe its token does not
/// grant is sent to the origin as a `subscribe` event, which accepts or
/// refuses it with a reason the client sees; `subscribe` is then not
/// consulted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Namespace {
    /// The namespace name, `[A-Za-z0-9_-]{1,64}`.
    pub name: String,
    /// Messages kept per channel for history and recovery (0: none).
    pub history_size: usize,
    /// How long kept messages stay.
    pub history_ttl: Duration,
    /// Whether presence is tracked.
    pub presence: bool,
    /// Whether joins and leaves are pushed to subscribers.
    pub join_leave: bool,
    /// Whether clients may publish.
    pub client_publish: bool,
    /// Whether clients may subscribe without the origin.
    pub client_subscribe: bool,
    /// Whether client publishes need the origin's approval.
    pub publish_to_origin: bool,
    /// Whether the origin decides client subscriptions its token does not
    /// grant (a `subscribe` event); `subscribe` is then not consulted.
    pub subscribe_to_origin: bool,
}

/// Largest `history-size` of a namespace.
pub const MAX_HISTORY_SIZE: usize = 1_000_000;

impl Namespace {
    /// A namespace with every option off.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            history_size: 0,
            history_ttl: Duration::from_secs(600),
            presence: false,
            join_leave: false,
            client_publish: false,
            client_subscribe: false,
            publish_to_origin: false,
            subscribe_to_origin: false,
        }
    }
}

impl std::str::FromStr for Namespace {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let (name, opts) = spec.split_once(':').unwrap_or((spec, ""));
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "namespace name `{name}` must be 1-64 characters of [A-Za-z0-9_-]"
            ));
        }
        let mut ns = Namespace::new(name);
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let flag = |v: Option<&str>| match v {
                None => Ok(true),
                Some(v) => v
                    .parse::<bool>()
                    .map_err(|_| format!("`{key}` takes true or false, not `{v}`")),
            };
            match key {
                "history-size" => {
                    let v = value.ok_or("history-size needs a value")?;
                    ns.history_size = v
                        .parse()
                        .ok()
                        .filter(|n| *n <= MAX_HISTORY_SIZE)
                        .ok_or(format!("history-size must be 0..={MAX_HISTORY_SIZE}"))?;
                }
                "history-ttl" => {
                    let v = value.ok_or("history-ttl needs a value")?;
                    ns.history_ttl = humantime::parse_duration(v)
                        .ok()
                        .filter(|d| !d.is_zero() && *d <= MAX_DURATION)
                        .ok_or("history-ttl must be a duration between 1ms and 7 days")?;
                }
                "presence" => ns.presence = flag(value)?,
                "join-leave" => ns.join_leave = flag(value)?,
                "publish" => ns.client_publish = flag(value)?,
                "subscribe" => ns.client_subscribe = flag(value)?,
                "publish-to-origin" => ns.publish_to_origin = flag(value)?,
                "subscribe-to-origin" => ns.subscribe_to_origin = flag(value)?,
                other => return Err(format!("unknown namespace option `{other}`")),
            }
        }
        if ns.join_leave && !ns.presence {
            return Err("join-leave needs presence".into());
        }
        if ns.publish_to_origin && !ns.client_publish {
            return Err("publish-to-origin needs publish".into());
        }
        Ok(ns)
    }
}

impl TryFrom<String> for Namespace {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:history-size={},history-ttl={}",
            self.name,
            self.history_size,
            humantime::format_duration(self.history_ttl)
        )?;
        for (on, opt) in [
            (self.presence, "presence"),
            (self.join_leave, "join-leave"),
            (self.client_publish, "publish"),
            (self.client_subscribe, "subscribe"),
            (self.publish_to_origin, "publish-to-origin"),
            (self.subscribe_to_origin, "subscribe-to-origin"),
        ] {
            if on {
                write!(f, ",{opt}")?;
            }
        }
        Ok(())
    }
}

impl From<Namespace> for String {
    fn from(ns: Namespace) -> String {
        ns.to_string()
    }
}
