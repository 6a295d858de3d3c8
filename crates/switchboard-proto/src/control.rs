//! Request and response bodies of the control API (`/v1/...`). The OpenAPI
//! document (`docs/openapi.json`) describes the same shapes.

use crate::native::StreamPosition;
use crate::origin::Payload;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `POST /v1/messages`: many messages, each to many connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSendRequest {
    /// The messages, delivered in order.
    pub messages: Vec<BatchMessage>,
}

/// One message of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMessage {
    /// Destinations.
    pub connection_ids: Vec<String>,
    /// The message.
    #[serde(flatten)]
    pub payload: Payload,
}

/// What happened to a message for one connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Queued for the connection.
    Delivered,
    /// Kept for a suspended session: sent when its client resumes
    /// (docs/sessions.md).
    Queued,
    /// No such connection (never existed, or closed).
    Unknown,
}

/// Answer to `POST /v1/messages`: for each message, in order, each id's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSendResponse {
    /// One map per message of the request.
    pub results: Vec<BTreeMap<String, Delivery>>,
}

/// Answer to `POST /v1/connections/{id}/messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    /// Always `delivered` (an unknown id is a 404).
    pub status: Delivery,
}

/// Optional query of `DELETE /v1/connections/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CloseParams {
    /// Close code (1000, 1001, 1008, 1011–1013, 3000–4999); default 1000.
    pub code: Option<u16>,
    /// Close reason (at most 123 bytes are sent).
    pub reason: Option<String>,
}

/// `GET /v1/connections/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The connection id.
    pub id: String,
    /// The node holding it.
    pub node: String,
    /// The client's address.
    pub remote_addr: String,
    /// Request path of the handshake.
    pub path: String,
    /// User id attached by the origin.
    pub user_id: Option<String>,
    /// Metadata attached by the origin.
    pub metadata: Option<serde_json::Value>,
    /// Negotiated subprotocol.
    pub subprotocol: Option<String>,
    /// Whether permessage-deflate is in use.
    pub compression: bool,
    /// What carries it: `websocket`, `sse`, `long-poll` or `eventsource`.
    #[serde(default)]
    pub transport: crate::origin::Transport,
    /// When the connection was accepted (RFC 3339, UTC).
    pub connected_at: String,
    /// Messages received from the client.
    pub messages_in: u64,
    /// Messages sent to the client.
    pub messages_out: u64,
    /// Bytes read from the client's socket (frame headers included).
    pub bytes_in: u64,
    /// Frame bytes sent.
    pub bytes_out: u64,
    /// Bytes queued for the client, not yet written.
    pub outbound_queued_bytes: u64,
    /// The channels it is subscribed to, sorted.
    #[serde(default)]
    pub channels: Vec<String>,
    /// A session that lost its connection and waits for its client to
    /// resume (docs/sessions.md).
    #[serde(default)]
    pub suspended: bool,
    /// Direct messages kept for a resume: sent and not acknowledged yet,
    /// or waiting for the client while suspended.
    #[serde(default)]
    pub outbox_messages: u64,
}

/// `GET /v1/connections?user_id=…`: the open connections of a user on
/// every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsResponse {
    /// The connections, sorted by id.
    pub connections: Vec<ConnectionInfo>,
    /// Live nodes that did not list theirs (unreachable, or too slow):
    /// their connections are missing above.
    #[serde(default)]
    pub unanswered: Vec<String>,
}

/// [`Command::Connections`]: whose connections to list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRef {
    /// The user id the origin (or the client's token) attached.
    pub user_id: String,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// This node's id.
    pub node: String,
    /// Open connections (accepted by the origin).
    pub connections: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Handshakes refused since start (by the origin or the gateway).
    pub handshakes_rejected_total: u64,
    /// Messages received from clients since start.
    pub messages_in_total: u64,
    /// Messages sent to clients since start.
    pub messages_out_total: u64,
    /// Bytes read from client sockets since start.
    pub bytes_in_total: u64,
    /// Frame bytes written to clients since start.
    pub bytes_out_total: u64,
    /// Events waiting for the origin.
    pub origin_queue_depth: u64,
    /// Whether the node is draining.
    pub draining: bool,
    /// Clients closed as slow consumers (4001) since start.
    #[serde(default)]
    pub slow_consumer_closes_total: u64,
    /// Requests to the origin since start (events, decisions, keepalives).
    #[serde(default)]
    pub origin_requests_total: u64,
    /// Time those requests took, summed, in microseconds (the mean latency
    /// over an interval is the difference of this over the difference of
    /// `origin_requests_total`).
    #[serde(default)]
    pub origin_request_microseconds_total: u64,
    /// Channels this node holds state for.
    #[serde(default)]
    pub channels: u64,
    /// Subscriptions of this node's connections.
    #[serde(default)]
    pub subscriptions: u64,
    /// Native sessions whose connection was lost, waiting for their client
    /// to resume (not counted in `connections`).
    #[serde(default)]
    pub sessions_suspended: u64,
}

/// Every error answer: a stable machine `code` and a human `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable error code (see `docs/control-api.md`).
    pub code: String,
    /// Human-readable explanation; its text may change.
    pub message: String,
}

/// One live node of the cluster, in `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub node: String,
    /// Open connections it holds (as of its last heartbeat).
    pub connections: u64,
    /// Whether it is draining.
    pub draining: bool,
    /// When it started, Unix time in milliseconds.
    pub started_at_ms: u64,
    /// When it was last heard from, Unix time in milliseconds.
    pub last_seen_ms: u64,
    /// Whether this is the node that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// `GET /v1/nodes`: the live nodes, sorted by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesResponse {
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
}

/// A control command as a JSON object tagged by `op`: the body of control
/// requests over NATS (`<prefix>.control`, `<prefix>.node.<id>.control`),
/// and of commands one node forwards to another. Each mirrors an HTTP route;
/// the reply is that route's status (header `Switchboard-Status`) and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// `POST /v1/connections/{id}/messages`.
    Send(SendCommand),
    /// `POST /v1/messages`.
    SendBatch(BatchSendRequest),
    /// `DELETE /v1/connections/{id}`.
    Close(CloseCommand),
    /// `GET /v1/connections/{id}`.
    Info(ConnectionRef),
    /// `GET /v1/stats` of the node that answers.
    Stats,
    /// `GET /v1/connections?user_id=…` (every node's, unless forwarded).
    Connections(UserRef),
    /// `GET /v1/nodes`.
    Nodes,
    /// `PUT /v1/connections/{id}/channels/{channel}`.
    Subscribe(SubscribeCommand),
    /// `DELETE /v1/connections/{id}/channels/{channel}`.
    Unsubscribe(UnsubscribeCommand),
    /// `POST /v1/channels/{channel}/messages`.
    Publish(PublishCommand),
    /// `GET /v1/channels/{channel}/messages`.
    History(HistoryCommand),
    /// `GET /v1/channels/{channel}/presence`.
    Presence(ChannelRef),
    /// `GET /v1/channels`.
    Channels,
    /// A request of an HTTP fallback session (`docs/fallbacks.md`) that
    /// reached another node than the one holding the session: only ever
    /// forwarded, never a route of the control API.
    Fallback(FallbackRequest),
    /// `POST /v1/graphql/triggers`: re-execute the GraphQL subscriptions
    /// that depend on these keys, on every node.
    GraphqlTrigger(GraphqlTrigger),
    /// A GraphQL subscription's result asked of the node that executes its
    /// digest (`docs/graphql.md`): only ever forwarded.
    GraphqlExecute(GraphqlExecute),
    /// A resume that reached another node than the one holding the
    /// session (`docs/sessions.md`): the holder gives the session up and
    /// answers with its [`SessionState`]. Only ever forwarded.
    SessionTake(SessionTake),
    /// A draining node hands a suspended session to another node, which
    /// keeps it for the client's resume. Only ever forwarded.
    SessionGive(Box<SessionState>),
}

/// [`Command::SessionTake`]: give up a session for a resume elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTake {
    /// The client's resume token (checked by the holder).
    pub token: String,
    /// The client's `?received=`: checked before the session is given up.
    pub received: u64,
    /// The node taking the session (commands for it go there afterwards).
    pub node: String,
    /// Sent on by a node the session had left: not to be sent further.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forwarded: bool,
}

/// A session moving from one node to another, suspended: everything a node
/// needs to resume it as if it had held it all along.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// The connection id (unchanged by the move).
    pub connection_id: String,
    /// Its resume token.
    pub token: String,
    /// The path it connected to.
    pub path: String,
    /// Its user, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The origin's `connect` metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// What its client token grants, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<SessionToken>,
    /// When that token expires, Unix ms (0: never).
    pub token_expires_ms: u64,
    /// The client's last address.
    pub remote_addr: String,
    /// When the session started, Unix ms.
    pub connected_at_ms: u64,
    /// Messages and bytes in and out so far (for `disconnect`).
    pub messages_in: u64,
    /// See `messages_in`.
    pub messages_out: u64,
    /// See `messages_in`.
    pub bytes_in: u64,
    /// See `messages_in`.
    pub bytes_out: u64,
    /// The sequence of the last direct message.
    pub last_seq: u64,
    /// Messages up to this sequence were dropped unacknowledged.
    pub trimmed_through: u64,
    /// The kept (unacknowledged) direct messages, oldest first: each its
    /// `direct` push as sent.
    pub kept: Vec<KeptMessage>,
    /// The `seq` of the last `message` event sent to the origin.
    pub origin_seq: u64,
    /// Times the session was suspended.
    pub suspensions: u32,
    /// How long it has been suspended, in ms.
    pub suspended_ms: u64,
    /// How long it may stay suspended from now, in ms.
    pub expires_in_ms: u64,
    /// Its own `session-ttl` in ms (set by the origin), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// A direct message was refused over its outbox's bounds while it was
    /// suspended: it is to end, and cannot be resumed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overflowed: bool,
    /// Its channels, each where it stopped being sent messages.
    pub channels: Vec<crate::native::SessionChannel>,
}

/// A direct message kept for a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptMessage {
    /// Its sequence.
    pub seq: u64,
    /// Its `direct` push, as JSON text.
    pub push: String,
}

/// What a session's client token grants, carried with the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionToken {
    /// The token's user (`sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Channels it may subscribe to (names or `*` patterns).
    pub subscribe: Vec<String>,
    /// Channels it may publish on.
    pub publish: Vec<String>,
}

/// [`Command::GraphqlTrigger`]: trigger keys published by the origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphqlTrigger {
    /// The keys (1 to 32, each 1 to 256 bytes).
    pub triggers: Vec<String>,
    /// Set by the node that took the command, for the nodes it forwards
    /// it to: one execution per digest and publication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
}

/// Body of `POST /v1/graphql/triggers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlTriggerBody {
    /// The keys (1 to 32, each 1 to 256 bytes).
    pub triggers: Vec<String>,
}

/// The answer to `POST /v1/graphql/triggers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphqlTriggerResponse {
    /// Nodes that took the trigger (this one included).
    pub nodes: usize,
    /// Nodes it could not reach in time: they miss this publication.
    pub failed_nodes: Vec<String>,
}

/// [`Command::GraphqlExecute`]: run a digest's request once for a
/// publication and answer with the endpoint's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphqlExecute {
    /// The subscription's digest.
    pub digest: String,
    /// The publication (of [`GraphqlTrigger`]) it is executed for.
    pub publication: String,
    /// The request body for the GraphQL endpoint (JSON).
    pub request: String,
    /// The request's headers (context and forwarded ones).
    pub headers: Vec<(String, String)>,
    /// HMAC of the above with a key derived from `origin-secret`, which
    /// every node of a cluster shares (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// [`Command::Fallback`]: what a fallback client asked of its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackRequest {
    /// The session's token (`?session=`).
    pub session: String,
    /// What is asked.
    #[serde(flatten)]
    pub action: FallbackAction,
}

/// What a [`FallbackRequest`] asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum FallbackAction {
    /// `POST ?session=`: commands, one per line (answered 204).
    Commands {
        /// The request body.
        body: String,
    },
    /// `DELETE ?session=`: the client ends the session (answered 204).
    End,
    /// A long-poll acknowledging `cursor`, waiting at most `wait_ms` for
    /// pushes (answered 200 with the batch).
    Poll {
        /// The cursor of the last answer the client received.
        cursor: u64,
        /// How long the holding node may wait for pushes.
        wait_ms: u64,
    },
}

/// [`Command::Subscribe`]: subscribe a connection to a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeCommand {
    /// The connection.
    pub connection_id: String,
    /// The channel.
    pub channel: String,
    /// Recover from this position (native connections get the missed
    /// messages first), as in the body of the HTTP route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
}

/// Body of `PUT /v1/connections/{id}/channels/{channel}` (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeBody {
    /// Recover from this position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
}

/// Answer of `PUT /v1/connections/{id}/channels/{channel}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeResponse {
    /// The channel's epoch.
    pub epoch: String,
    /// The channel's newest offset when the subscription started.
    pub offset: u64,
    /// With `since`: whether every missed message was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// The connection was already subscribed (nothing changed).
    pub already: bool,
}

/// [`Command::Unsubscribe`]: unsubscribe a connection from a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsubscribeCommand {
    /// The connection.
    pub connection_id: String,
    /// The channel.
    pub channel: String,
}

/// [`Command::Publish`], and the body of `POST /v1/channels/{channel}/messages`
/// (without `channel`, which is in the path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishCommand {
    /// The channel.
    #[serde(default)]
    pub channel: String,
    /// The message.
    #[serde(flatten)]
    pub payload: Payload,
    /// A retried publish with the same key (per channel, within five
    /// minutes) is not published again; the first one's position is returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Answer of `POST /v1/channels/{channel}/messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    /// The message's offset.
    pub offset: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// The idempotency key was seen before: this publish did nothing.
    pub duplicate: bool,
}

/// [`Command::History`]: a channel's kept messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryCommand {
    /// The channel.
    pub channel: String,
    /// Only messages after this position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
    /// At most this many: with `since` the oldest ones after it, without it
    /// the newest ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// Names a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRef {
    /// The channel.
    pub channel: String,
}

/// One channel in `GET /v1/channels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSummary {
    /// The channel.
    pub channel: String,
    /// Its epoch.
    pub epoch: String,
    /// Its newest offset.
    pub offset: u64,
    /// Connections of this node subscribed to it.
    pub subscribers: usize,
    /// Messages kept for history.
    pub kept: usize,
}

/// Answer of `GET /v1/channels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelsResponse {
    /// Every channel the node holds state for, by name.
    pub channels: Vec<ChannelSummary>,
}

/// [`Command::Send`]: one message to one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendCommand {
    /// The destination.
    pub connection_id: String,
    /// The message.
    #[serde(flatten)]
    pub payload: Payload,
}

/// [`Command::Close`]: close one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseCommand {
    /// The connection.
    pub connection_id: String,
    /// Code and reason, as in the query of `DELETE /v1/connections/{id}`.
    #[serde(flatten)]
    pub params: CloseParams,
}

/// [`Command::Info`]: names a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRef {
    /// The connection.
    pub connection_id: String,
}

/// The NATS header carrying the HTTP status of a command's reply (and of the
/// origin's answer to `connect` over NATS).
pub const STATUS_HEADER: &str = "Switchboard-Status";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_flat_json_tagged_by_op() {
        let json = r#"{"op":"send","connection_id":"a.x","text":"hi"}"#;
        let cmd: Command = serde_json::from_str(json).unwrap();
        assert_eq!(
            cmd,
            Command::Send(SendCommand {
                connection_id: "a.x".into(),
                payload: Payload::Text("hi".into()),
            })
        );
        assert_eq!(serde_json::to_string(&cmd).unwrap(), json);
        let close: Command =
            serde_json::from_str(r#"{"op":"close","connection_id":"a.x","code":4000}"#).unwrap();
        assert_eq!(
            close,
            Command::Close(CloseCommand {
                connection_id: "a.x".into(),
                params: CloseParams {
                    code: Some(4000),
                    reason: None
                },
            })
        );
        let batch: Command = serde_json::from_str(
            r#"{"op":"send_batch","messages":[{"connection_ids":["a.x"],"binary":"AAE="}]}"#,
        )
        .unwrap();
        assert!(
            matches!(batch, Command::SendBatch(b) if b.messages[0].payload == Payload::Binary(vec![0, 1]))
        );
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"op":"nodes"}"#).unwrap(),
            Command::Nodes
        );
        assert!(serde_json::from_str::<Command>(r#"{"op":"explode"}"#).is_err());
    }
}
