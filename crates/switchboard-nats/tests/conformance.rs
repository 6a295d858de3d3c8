//! The backend conformance suite (`switchboard_backend::conformance`) on
//! NATS: every node is a stand-in with its own NATS connection, every check
//! its own subject prefix, on a test-started `nats-server -js`.

use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::conformance::{self, Backend, Joined, StandInNode};
use switchboard_backend::{BoxFuture, Namespace, Node};
use switchboard_nats::{BeatConnection, NatsChannels, NatsCluster, NatsConfig};
use switchboard_test_util::nats::NatsServer;

/// Connects to NATS as `name` and waits (5 s at most) until it is up.
async fn connect(
    config: &NatsConfig,
    name: &str,
) -> (async_nats::Client, std::sync::Arc<switchboard_nats::Link>) {
    let (client, link) = switchboard_nats::connect(config, name)
        .await
        .expect("connect to NATS");
    for _ in 0..250 {
        if link.is_up() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(link.is_up(), "connected to NATS within 5 s");
    (client, link)
}

struct Nats {
    server: NatsServer,
}

impl Backend for Nats {
    fn join<'a>(
        &'a self,
        cluster: &'a str,
        node: Arc<StandInNode>,
        namespaces: &'a [Namespace],
    ) -> BoxFuture<'a, Joined> {
        Box::pin(async move {
            let config = NatsConfig {
                prefix: format!("conformance-{cluster}"),
                heartbeat: Duration::from_millis(100),
                heartbeat_timeout: Duration::from_millis(600),
                request_timeout: Duration::from_millis(500),
                namespaces: namespaces.to_vec(),
                ..NatsConfig::new(self.server.url())
            };
            let (client, link) = connect(&config, node.id()).await;
            let as_node: Arc<dyn Node> = node.clone();
            // One connection for everything, on the test's runtime.
            let membership = BeatConnection {
                client: client.clone(),
                link: link.clone(),
                runtime: tokio::runtime::Handle::current(),
            };
            let cluster = NatsCluster::start(
                client.clone(),
                link,
                as_node.clone(),
                config.clone(),
                membership,
            )
            .await
            .expect("cluster started");
            let bus = NatsChannels::start(client, as_node, config, cluster.clone())
                .await
                .expect("channels started");
            Joined {
                node,
                cluster: cluster.clone(),
                bus: bus.clone(),
                handle: Box::new((cluster, bus)),
            }
        })
    }

    fn kill(&self, _cluster: &str, joined: Joined) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (cluster, bus) = joined
                .handle
                .downcast_ref::<(Arc<NatsCluster>, Arc<NatsChannels>)>()
                .expect("a NATS node");
            cluster.halt();
            bus.stop();
        })
    }

    fn settle(&self) -> Duration {
        // The heartbeat timeout, the wait after connecting before judging,
        // and scheduling slack.
        Duration::from_secs(3)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_nats() {
    let backend = Nats {
        server: NatsServer::start(true),
    };
    conformance::run(&backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_store_passes_on_jetstream() {
    let server = NatsServer::start(true);
    let config = NatsConfig {
        prefix: "conformance-sessions".into(),
        session_messages: 8,
        ..NatsConfig::new(server.url())
    };
    let (client, _link) = connect(&config, "store").await;
    let store = switchboard_nats::NatsSessions::new(client, config);
    conformance::run_session_store(&store, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_on_the_beat_thread_outlast_a_stalled_runtime() {
    let server = Arc::new(NatsServer::start(true));
    let timeout = Duration::from_millis(600);
    let start: conformance::StartOn = Arc::new(move |cluster, node, beats| {
        let server = server.clone();
        Box::pin(async move {
            let config = NatsConfig {
                prefix: cluster,
                heartbeat: Duration::from_millis(100),
                heartbeat_timeout: timeout,
                request_timeout: Duration::from_millis(500),
                ..NatsConfig::new(server.url())
            };
            // As the binary does: the main connection from the node's
            // runtime, the membership's from its thread.
            let (client, link) = connect(&config, node.id()).await;
            let (cfg, name) = (config.clone(), format!("{}-membership", node.id()));
            let (beat_client, beat_link) = beats
                .spawn(async move { connect(&cfg, &name).await })
                .await
                .expect("connected");
            let membership = BeatConnection {
                client: beat_client,
                link: beat_link,
                runtime: beats,
            };
            let cluster = NatsCluster::start(client, link, node, config, membership)
                .await
                .expect("cluster started");
            Box::new((cluster, server)) as Box<dyn std::any::Any + Send>
        })
    });
    conformance::run_stall(start, timeout).await;
}
