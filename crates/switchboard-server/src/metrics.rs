//! Prometheus metrics of one node, exposed at `GET /metrics` on the control
//! listener. Names and labels are documented in `docs/operations.md`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label for handshake outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

/// Label for listeners (`client`, `control`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerLabel {
    pub(crate) listener: &'static str,
}

/// Label for origin request kinds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub(crate) kind: &'static str,
}

/// Label for native protocol errors: the `error.code` sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabel {
    pub(crate) code: &'static str,
}

/// Labels of HTTP fallback requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FallbackLabels {
    pub(crate) request: &'static str,
    pub(crate) result: &'static str,
}

/// Labels of requests to the GraphQL endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GraphqlRequestLabels {
    pub(crate) reason: &'static str,
    pub(crate) result: &'static str,
}

/// Label for transports.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TransportLabel {
    pub(crate) transport: &'static str,
}

/// Label for disconnects.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClosedByLabel {
    pub(crate) closed_by: &'static str,
}

/// Label for control listener refusals and timeouts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

/// Every metric of the node.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) connections: Gauge,
    pub(crate) connections_total: Counter,
    pub(crate) handshakes: Family<ResultLabel, Counter>,
    /// Sum of `handshakes` over every result but `accepted`, for `/v1/stats`.
    pub(crate) handshakes_rejected: Counter,
    pub(crate) disconnects: Family<ClosedByLabel, Counter>,
    pub(crate) frames_in: Counter,
    pub(crate) frames_out: Counter,
    pub(crate) messages_in: Counter,
    pub(crate) messages_out: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) protocol_errors: Counter,
    pub(crate) slow_consumer_closes: Counter,
    pub(crate) backlog_closes: Counter,
    pub(crate) origin_duration: Family<KindLabel, Histogram>,
    /// Origin requests and their summed time (µs), for `GET /v1/stats`.
    pub(crate) origin_requests: Counter,
    pub(crate) origin_request_micros: Counter,
    /// `switchboard_build_info`: 1, labelled with the build.
    pub(crate) build_info: Family<Vec<(&'static str, &'static str)>, Gauge>,
    pub(crate) origin_failures: Family<KindLabel, Counter>,
    pub(crate) origin_retries: Counter,
    pub(crate) origin_queue_depth: Gauge,
    pub(crate) origin_events_delivered: Counter,
    pub(crate) origin_events_dropped: Counter,
    pub(crate) fences: Counter,
    pub(crate) fenced_events: Counter,
    pub(crate) lease_refusals: Family<KindLabel, Counter>,
    pub(crate) forwarded: Counter,
    pub(crate) forward_failures: Counter,
    pub(crate) channels: Gauge,
    pub(crate) subscriptions: Gauge,
    pub(crate) publications: Counter,
    pub(crate) deliveries: Counter,
    pub(crate) native_commands: Family<KindLabel, Counter>,
    pub(crate) native_errors: Family<CodeLabel, Counter>,
    pub(crate) bus_received: Counter,
    pub(crate) rate_limited: Counter,
    pub(crate) bus_gap_fills: Counter,
    pub(crate) bus_lost: Counter,
    pub(crate) tls_reloads: Family<ResultLabel, Counter>,
    pub(crate) control_tls_failures: Counter,
    /// Control listener connections open now.
    pub(crate) control_connections: Gauge,
    /// Control listener refusals and timeouts, by reason.
    pub(crate) control_refusals: Family<ReasonLabel, Counter>,
    pub(crate) accept_errors: Family<ListenerLabel, Counter>,
    /// Sessions without a socket, waiting for their client to resume.
    pub(crate) sessions_suspended: Gauge,
    /// Resume attempts by result (`resumed` or the refusal's code).
    pub(crate) session_resumes: Family<ResultLabel, Counter>,
    /// Sessions that ended while suspended, by reason (`expired`,
    /// `outbox_overflow`, `closed`, `shutdown`).
    pub(crate) sessions_lost: Family<ReasonLabel, Counter>,
    /// Open sockets closed because their session resumed on another (4009).
    pub(crate) session_takeovers: Counter,
    /// Sessions moved between nodes, by result (`sent`, `received`,
    /// `failed`, `too_large`).
    pub(crate) session_handoffs: Family<ResultLabel, Counter>,
    /// The session store's work, by result (`record`, `messages`, `removed`,
    /// `taken_over`, `conflict`, `too_large`, `failed`, `timeout`).
    pub(crate) session_store: Family<ResultLabel, Counter>,
    /// Direct messages kept for resumes (sent, not acknowledged).
    pub(crate) session_outbox_messages: Gauge,
    pub(crate) session_outbox_bytes: Gauge,
    /// Kept messages dropped unacknowledged over the outbox's bounds while
    /// the client was connected.
    pub(crate) session_outbox_trimmed: Counter,
    /// HTTP fallback requests by kind and result (`ok` or the refusal's code).
    pub(crate) fallback_requests: Family<FallbackLabels, Counter>,
    /// Open connections by transport.
    pub(crate) connections_by_transport: Family<TransportLabel, Gauge>,
    /// Fallback requests sent to the node holding their session.
    pub(crate) fallback_forwarded: Counter,
    /// Requests to the GraphQL endpoint by reason and result.
    pub(crate) graphql_requests: Family<GraphqlRequestLabels, Counter>,
    /// Results asked of a digest's owner node, by result.
    pub(crate) graphql_owner_requests: Family<ResultLabel, Counter>,
    /// GraphQL operations running on this node.
    pub(crate) graphql_operations: Gauge,
    /// Distinct subscription inputs on this node.
    pub(crate) graphql_digests: Gauge,
    /// Subscription results sent to clients.
    pub(crate) graphql_deliveries: Counter,
    /// Re-executed results not sent because unchanged.
    pub(crate) graphql_suppressed: Counter,
    /// GraphQL connections closed with a protocol close code, by code.
    pub(crate) graphql_closes: Family<CodeLabel, Counter>,
    /// GraphQL operations refused without running, by code.
    pub(crate) graphql_refused: Family<CodeLabel, Counter>,
}

fn origin_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let m = Self {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            handshakes: Family::default(),
            handshakes_rejected: Counter::default(),
            disconnects: Family::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            protocol_errors: Counter::default(),
            slow_consumer_closes: Counter::default(),
            backlog_closes: Counter::default(),
            origin_duration: Family::new_with_constructor(origin_histogram),
            origin_requests: Counter::default(),
            origin_request_micros: Counter::default(),
            build_info: Family::default(),
            origin_failures: Family::default(),
            origin_retries: Counter::default(),
            origin_queue_depth: Gauge::default(),
            origin_events_delivered: Counter::default(),
            origin_events_dropped: Counter::default(),
            fences: Counter::default(),
            fenced_events: Counter::default(),
            lease_refusals: Family::default(),
            forwarded: Counter::default(),
            forward_failures: Counter::default(),
            channels: Gauge::default(),
            subscriptions: Gauge::default(),
            publications: Counter::default(),
            deliveries: Counter::default(),
            native_commands: Family::default(),
            native_errors: Family::default(),
            bus_received: Counter::default(),
            rate_limited: Counter::default(),
            bus_gap_fills: Counter::default(),
            bus_lost: Counter::default(),
            tls_reloads: Family::default(),
            control_tls_failures: Counter::default(),
            control_connections: Gauge::default(),
            control_refusals: Family::default(),
            accept_errors: Family::default(),
            sessions_suspended: Gauge::default(),
            session_resumes: Family::default(),
            sessions_lost: Family::default(),
            session_takeovers: Counter::default(),
            session_handoffs: Family::default(),
            session_store: Family::default(),
            session_outbox_messages: Gauge::default(),
            session_outbox_bytes: Gauge::default(),
            session_outbox_trimmed: Counter::default(),
            fallback_requests: Family::default(),
            connections_by_transport: Family::default(),
            fallback_forwarded: Counter::default(),
            graphql_requests: Family::default(),
            graphql_owner_requests: Family::default(),
            graphql_operations: Gauge::default(),
            graphql_digests: Gauge::default(),
            graphql_deliveries: Counter::default(),
            graphql_suppressed: Counter::default(),
            graphql_closes: Family::default(),
            graphql_refused: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open client connections accepted by the origin",
            m.connections.clone(),
        );
        r.register(
            "connections_accepted",
            "Connections accepted since start",
            m.connections_total.clone(),
        );
        r.register("handshakes", "Handshakes by result", m.handshakes.clone());
        r.register(
            "fallback_requests",
            "HTTP fallback requests (SSE, long-polling, EventSource) by request and result",
            m.fallback_requests.clone(),
        );
        r.register(
            "fallback_forwarded",
            "HTTP fallback requests (commands, polls, ends) forwarded to the node holding their session",
            m.fallback_forwarded.clone(),
        );
        r.register(
            "graphql_requests",
            "Requests to the GraphQL endpoint by reason (operation, trigger) and result (ok, error, unavailable)",
            m.graphql_requests.clone(),
        );
        r.register(
            "graphql_owner_requests",
            "GraphQL subscription results asked of the digest's owner node, by result (ok, failed)",
            m.graphql_owner_requests.clone(),
        );
        r.register(
            "graphql_operations",
            "GraphQL operations running on this node",
            m.graphql_operations.clone(),
        );
        r.register(
            "graphql_digests",
            "Distinct GraphQL subscription inputs on this node",
            m.graphql_digests.clone(),
        );
        r.register(
            "graphql_deliveries",
            "GraphQL subscription results sent to clients",
            m.graphql_deliveries.clone(),
        );
        r.register(
            "graphql_suppressed",
            "Re-executed GraphQL results not sent because unchanged",
            m.graphql_suppressed.clone(),
        );
        r.register(
            "graphql_closes",
            "GraphQL connections closed with a protocol close code, by code",
            m.graphql_closes.clone(),
        );
        r.register(
            "graphql_refused_operations",
            "GraphQL operations answered with an error without running, and origin replies to GraphQL connections dropped (origin_reply), by code",
            m.graphql_refused.clone(),
        );
        r.register(
            "connections_by_transport",
            "Open client connections by transport (websocket, sse, long-poll, eventsource)",
            m.connections_by_transport.clone(),
        );
        r.register(
            "disconnects",
            "Ended connections by who closed them",
            m.disconnects.clone(),
        );
        r.register(
            "frames_in",
            "WebSocket messages and control frames received from clients (a fragmented message counts once)",
            m.frames_in.clone(),
        );
        r.register(
            "frames_out",
            "WebSocket frames queued to clients",
            m.frames_out.clone(),
        );
        r.register(
            "messages_in",
            "Data messages received from clients",
            m.messages_in.clone(),
        );
        r.register(
            "messages_out",
            "Data messages queued to clients",
            m.messages_out.clone(),
        );
        r.register(
            "bytes_in",
            "Bytes read from client sockets",
            m.bytes_in.clone(),
        );
        r.register(
            "bytes_out",
            "Bytes written to client sockets",
            m.bytes_out.clone(),
        );
        r.register(
            "cluster_forwarded",
            "Control commands forwarded to another node of the cluster",
            m.forwarded.clone(),
        );
        r.register(
            "cluster_forward_failures",
            "Forwarded commands that got no answer (node gone, bus down, timeout)",
            m.forward_failures.clone(),
        );
        r.register(
            "protocol_errors",
            "Connections closed for breaking RFC 6455",
            m.protocol_errors.clone(),
        );
        r.register(
            "sessions_suspended",
            "Sessions whose connection was lost, kept for a resume (session-ttl)",
            m.sessions_suspended.clone(),
        );
        r.register(
            "session_resumes",
            "Resume attempts by result: resumed, or the refusal's code",
            m.session_resumes.clone(),
        );
        r.register(
            "sessions_lost",
            "Suspended sessions ended without a resume, by reason (expired, outbox_overflow, closed, shutdown)",
            m.sessions_lost.clone(),
        );
        r.register(
            "session_takeovers",
            "Sockets closed (4009) because their session was resumed on a new one",
            m.session_takeovers.clone(),
        );
        r.register(
            "session_handoffs",
            "Sessions moved between nodes (a resume elsewhere, a drain), by result: sent, received, failed, too_large",
            m.session_handoffs.clone(),
        );
        r.register(
            "session_store",
            "Sessions kept in the cluster's session store, by result: record (a record written), messages (direct messages written), removed, taken_over (a lost node's session adopted), conflict (another node holds it now), too_large (a message over the store's limit, not stored), failed, timeout (a control-API send answered before its message was stored)",
            m.session_store.clone(),
        );
        r.register(
            "session_outbox_messages",
            "Direct messages kept for resumes (sent, not acknowledged by the client)",
            m.session_outbox_messages.clone(),
        );
        r.register(
            "session_outbox_bytes",
            "Bytes of the direct messages kept for resumes",
            m.session_outbox_bytes.clone(),
        );
        r.register(
            "session_outbox_trimmed",
            "Kept direct messages dropped unacknowledged over session-outbox-messages or -bytes",
            m.session_outbox_trimmed.clone(),
        );
        r.register(
            "slow_consumer_closes",
            "Connections closed (4001) because their outbound queue overflowed",
            m.slow_consumer_closes.clone(),
        );
        r.register(
            "origin_backlog_closes",
            "Connections closed (4002) because their origin event queue overflowed",
            m.backlog_closes.clone(),
        );
        r.register(
            "origin_request_duration_seconds",
            "Origin request latency by kind (connect, events, keepalive)",
            m.origin_duration.clone(),
        );
        r.register(
            "build_info",
            "The build: always 1, labelled with version, commit, build date and features",
            m.build_info.clone(),
        );
        r.register(
            "origin_request_failures",
            "Failed origin requests by kind",
            m.origin_failures.clone(),
        );
        r.register(
            "origin_retries",
            "Origin event requests retried",
            m.origin_retries.clone(),
        );
        r.register(
            "origin_queue_depth",
            "Events waiting for the origin",
            m.origin_queue_depth.clone(),
        );
        r.register(
            "origin_events_delivered",
            "Events the origin acknowledged",
            m.origin_events_delivered.clone(),
        );
        r.register(
            "origin_events_dropped",
            "Events given up on (permanent origin error, or drain timeout)",
            m.origin_events_dropped.clone(),
        );
        r.register(
            "fences",
            "Times this node found itself reported lost and fenced itself (closed its connections without events)",
            m.fences.clone(),
        );
        r.register(
            "fenced_events",
            "Origin events about this node's connections dropped because the node was fenced",
            m.fenced_events.clone(),
        );
        r.register(
            "lease_refusals",
            "Requests refused while this node's cluster lease had run out, by kind (command, publish, subscribe)",
            m.lease_refusals.clone(),
        );
        r.register(
            "channels",
            "Channels this node holds state for (subscribers or kept history)",
            m.channels.clone(),
        );
        r.register(
            "subscriptions",
            "Channel subscriptions of this node's connections",
            m.subscriptions.clone(),
        );
        r.register(
            "publications",
            "Messages published to channels on this node",
            m.publications.clone(),
        );
        r.register(
            "channel_deliveries",
            "Channel messages queued to subscribers",
            m.deliveries.clone(),
        );
        r.register(
            "native_commands",
            "Native protocol (switchboard.v1) commands by name",
            m.native_commands.clone(),
        );
        r.register(
            "native_command_errors",
            "Native protocol commands answered with an error",
            m.native_errors.clone(),
        );
        r.register(
            "rate_limited_messages",
            "Client messages refused for exceeding client-message-rate or client-byte-rate",
            m.rate_limited.clone(),
        );
        r.register(
            "channel_bus_received",
            "Channel messages received from the cluster bus (once per message per node with subscribers)",
            m.bus_received.clone(),
        );
        r.register(
            "channel_bus_gap_fills",
            "Times messages missing from the bus were read from the channel log",
            m.bus_gap_fills.clone(),
        );
        r.register(
            "channel_bus_lost",
            "Times a channel's messages went missing on the way to this node and no log had them (its native subscribers were unsubscribed)",
            m.bus_lost.clone(),
        );
        r.register(
            "tls_reloads",
            "Changes of the TLS certificate files seen, by result (reloaded, failed: the current certificate is kept)",
            m.tls_reloads.clone(),
        );
        r.register(
            "control_tls_handshake_failures",
            "Control API connections whose TLS handshake failed or timed out",
            m.control_tls_failures.clone(),
        );
        r.register(
            "control_connections",
            "Connections open on the control listener",
            m.control_connections.clone(),
        );
        r.register(
            "control_refusals",
            "Control listener requests and connections refused or timed out, by reason (bad_request, uri_too_long, headers_too_large, header_timeout, body_timeout, idle_timeout, over_capacity)",
            m.control_refusals.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accept() calls by listener (EMFILE/ENFILE: out of file descriptors)",
            m.accept_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a native protocol error answer by its code.
    pub(crate) fn native_error(&self, code: switchboard_proto::native::ErrorCode) {
        self.native_errors
            .get_or_create(&CodeLabel {
                code: code.as_str(),
            })
            .inc();
    }

    /// Records how long an origin request of `kind` took.
    pub(crate) fn origin_request(&self, kind: &'static str, took: std::time::Duration) {
        self.origin_duration
            .get_or_create(&KindLabel { kind })
            .observe(took.as_secs_f64());
        self.origin_requests.inc();
        self.origin_request_micros
            .inc_by(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// Counts a handshake outcome; anything but `accepted` is a rejection.
    pub(crate) fn handshake(&self, result: &'static str) {
        self.handshakes.get_or_create(&ResultLabel { result }).inc();
        if result != "accepted" {
            self.handshakes_rejected.inc();
        }
    }

    /// Counts an HTTP fallback request by kind and result.
    pub(crate) fn fallback(&self, request: &'static str, result: &'static str) {
        self.fallback_requests
            .get_or_create(&FallbackLabels { request, result })
            .inc();
    }

    /// The gauge of open connections carried by `transport`.
    pub(crate) fn by_transport(&self, transport: &'static str) -> Gauge {
        self.connections_by_transport
            .get_or_create(&TransportLabel { transport })
            .clone()
    }

    /// Counts a control listener refusal or timeout by its reason.
    pub(crate) fn control_refusal(&self, reason: &'static str) {
        self.control_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("writing to a String cannot fail");
        s
    }
}
