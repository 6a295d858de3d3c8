//! The backend conformance suite (`switchboard_backend::conformance`) on
//! Redis: every node is a stand-in with its own Redis connections, every
//! check its own key prefix, on a test-started `redis-server`.

use std::sync::Arc;
use std::time::Duration;
use switchboard_backend::conformance::{self, Backend, Joined, StandInNode};
use switchboard_backend::{BoxFuture, Namespace, Node};
use switchboard_redis::{RedisChannels, RedisCluster, RedisConfig};
use switchboard_test_util::redis::RedisServer;

struct Redis {
    server: RedisServer,
}

impl Backend for Redis {
    fn join<'a>(
        &'a self,
        cluster: &'a str,
        node: Arc<StandInNode>,
        namespaces: &'a [Namespace],
    ) -> BoxFuture<'a, Joined> {
        Box::pin(async move {
            let config = RedisConfig {
                prefix: format!("conformance-{cluster}"),
                heartbeat: Duration::from_millis(100),
                heartbeat_timeout: Duration::from_millis(600),
                request_timeout: Duration::from_millis(500),
                namespaces: namespaces.to_vec(),
                ..RedisConfig::new(self.server.url())
            };
            let redis = switchboard_redis::connect(&config).expect("a Redis client");
            let as_node: Arc<dyn Node> = node.clone();
            let cluster = RedisCluster::start(
                redis.clone(),
                as_node.clone(),
                config.clone(),
                &tokio::runtime::Handle::current(),
            );
            let bus = RedisChannels::start(redis, as_node, config, cluster.clone());
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
                .downcast_ref::<(Arc<RedisCluster>, Arc<RedisChannels>)>()
                .expect("a Redis node");
            cluster.halt();
            bus.stop();
        })
    }

    fn settle(&self) -> Duration {
        // The heartbeat timeout, the wait after joining before judging,
        // and scheduling slack.
        Duration::from_secs(3)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_redis() {
    let backend = Redis {
        server: RedisServer::start(),
    };
    conformance::run(&backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_on_the_beat_thread_outlast_a_stalled_runtime() {
    let server = Arc::new(RedisServer::start());
    let timeout = Duration::from_millis(600);
    let start: conformance::StartOn = Arc::new(move |cluster, node, beats| {
        let server = server.clone();
        Box::pin(async move {
            let config = RedisConfig {
                prefix: cluster,
                heartbeat: Duration::from_millis(100),
                heartbeat_timeout: timeout,
                request_timeout: Duration::from_millis(500),
                ..RedisConfig::new(server.url())
            };
            let redis = switchboard_redis::connect(&config).expect("a Redis client");
            let cluster = RedisCluster::start(redis, node, config, &beats);
            Box::new((cluster, server)) as Box<dyn std::any::Any + Send>
        })
    });
    conformance::run_stall(start, timeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_store_passes_on_redis() {
    let server = RedisServer::start();
    let config = RedisConfig {
        prefix: "conformance-sessions".into(),
        session_messages: 8,
        ..RedisConfig::new(server.url())
    };
    let redis = switchboard_redis::connect(&config).expect("a Redis client");
    let store = switchboard_redis::RedisSessions::new(redis, &config);
    conformance::run_session_store(&store, 8).await;
}

/// The store over a Redis that requires an ACL user and password (the
/// default user disabled), given in the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_in_the_url_is_used() {
    let server = RedisServer::start_with(&[
        "--user", "default", "off", "--user", "gateway", "on", ">s3cret", "~*", "&*", "+@all",
    ]);
    let url = server.url().replace("redis://", "redis://gateway:s3cret@");
    let config = RedisConfig {
        prefix: "acl".into(),
        session_messages: 8,
        ..RedisConfig::new(url)
    };
    let redis = switchboard_redis::connect(&config).expect("a Redis client");
    assert!(redis.ping(Duration::from_secs(5)).await, "authenticated");
    let store = switchboard_redis::RedisSessions::new(redis, &config);
    conformance::run_session_store(&store, 8).await;

    let wrong = RedisConfig::new(server.url().replace("redis://", "redis://gateway:nope@"));
    let refused = switchboard_redis::connect(&wrong).expect("a Redis client");
    assert!(
        !refused.ping(Duration::from_millis(500)).await,
        "a wrong password is refused"
    );
}

/// The store over `rediss://`: a Redis serving TLS only, with a certificate
/// for 127.0.0.1 from the test CA of the TLS fixtures, which the node is
/// given with `tls_ca`. Without it (system roots) the node cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_given_ca() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../switchboard-server/tests/fixtures/tls");
    let server = RedisServer::start_tls(
        &fixtures.join("server-a.pem"),
        &fixtures.join("server-a-key.pem"),
        &fixtures.join("ca.pem"),
    );
    assert!(server.url().starts_with("rediss://"), "{}", server.url());
    let config = RedisConfig {
        prefix: "tls".into(),
        session_messages: 8,
        tls_ca: Some(fixtures.join("ca.pem")),
        ..RedisConfig::new(server.url())
    };
    let redis = switchboard_redis::connect(&config).expect("a Redis client");
    assert!(redis.ping(Duration::from_secs(5)).await, "TLS with the CA");
    let store = switchboard_redis::RedisSessions::new(redis, &config);
    conformance::run_session_store(&store, 8).await;

    let untrusted = switchboard_redis::connect(&RedisConfig::new(server.url())).expect("a client");
    assert!(
        !untrusted.ping(Duration::from_millis(500)).await,
        "a certificate the system does not trust is refused"
    );
}
