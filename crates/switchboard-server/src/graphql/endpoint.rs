//! The origin's GraphQL-over-HTTP endpoint: one signed POST per execution,
//! at most `graphql-concurrency` in flight, each within `graphql-timeout`,
//! and what its answer makes of the operation ([`Outcome`]).

use crate::metrics::{GraphqlRequestLabels, Metrics};
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::time::Duration;
use switchboard_proto::graphql::{self as gql, SubscriptionExt};
use tokio::sync::Semaphore;

/// Largest answer read from the endpoint, in bytes.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// What the endpoint's answer makes of an operation.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A query's or a mutation's result (the payload of `next`).
    Result(Box<RawValue>),
    /// A subscription: its initial result, if any, and its extension.
    Subscription {
        initial: Option<Box<RawValue>>,
        ext: SubscriptionExt,
    },
    /// GraphQL errors and no data: the operation failed (a JSON array).
    Errors(Box<RawValue>),
    /// No GraphQL answer: unreachable, failed, timed out, not GraphQL.
    Unavailable(String),
}

impl Outcome {
    /// The payload subscribers get for a re-execution: the result, or the
    /// errors as a result (the subscription goes on); `None` for a
    /// subscription answer without data.
    pub(crate) fn as_update(&self) -> Option<Box<RawValue>> {
        match self {
            Self::Result(p) => Some(p.clone()),
            Self::Subscription { initial, .. } => initial.clone(),
            Self::Errors(errors) => Some(raw(&format!(r#"{{"errors":{}}}"#, errors.get()))),
            Self::Unavailable(why) => {
                let errors = gql::errors_of(why, "origin_unavailable");
                Some(raw(&format!(r#"{{"errors":{}}}"#, errors.get())))
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Result(_) | Self::Subscription { .. } => "ok",
            Self::Errors(_) => "error",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

/// The endpoint and the slots of requests to it.
#[derive(Debug)]
pub(crate) struct Endpoint {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Vec<u8>>,
    node: String,
    slots: Semaphore,
    timeout: Duration,
}

impl Endpoint {
    /// The endpoint at `url`; requests signed with `secret` when given.
    pub(crate) fn new(
        url: &str,
        secret: Option<&str>,
        timeout: Duration,
        concurrency: usize,
        node: &str,
    ) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("bad GraphQL endpoint: {e}"))?;
        let client = crate::origin::http::client(timeout).map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            url,
            secret: secret.map(|s| s.as_bytes().to_vec()),
            node: node.to_owned(),
            slots: Semaphore::new(concurrency),
            timeout,
        })
    }

    /// Executes one request: waits for a slot, posts `body` with
    /// `headers`, and reads the answer. `reason` labels the metric
    /// (`operation` or `trigger`).
    pub(crate) async fn execute(
        &self,
        body: Bytes,
        headers: &[(String, String)],
        reason: &'static str,
        metrics: &Metrics,
    ) -> Outcome {
        // The wait for a slot counts in the request's time.
        let run = async {
            let _slot = self.slots.acquire().await;
            self.post(body, headers).await
        };
        let outcome = tokio::time::timeout(self.timeout, run)
            .await
            .unwrap_or_else(|_| Outcome::Unavailable("the GraphQL endpoint timed out".into()));
        metrics
            .graphql_requests
            .get_or_create(&GraphqlRequestLabels {
                reason,
                result: outcome.label(),
            })
            .inc();
        if let Outcome::Unavailable(why) = &outcome {
            tracing::warn!(url = %self.url, reason = why, "GraphQL endpoint unavailable");
        }
        outcome
    }

    async fn post(&self, body: Bytes, headers: &[(String, String)]) -> Outcome {
        let mut req = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header(
                "accept",
                "application/graphql-response+json, application/json",
            )
            .header("x-switchboard-node", &self.node);
        for (name, value) in headers {
            req = req.header(name.as_str(), value.as_str());
        }
        if let Some(secret) = &self.secret {
            req = crate::origin::http::signed(req, secret, &body);
        }
        let resp = match req.body(body).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Outcome::Unavailable("the GraphQL endpoint timed out".into())
            }
            Err(e) => {
                return Outcome::Unavailable(format!(
                    "the GraphQL endpoint could not be reached: {e}"
                ))
            }
        };
        let status = resp.status().as_u16();
        if resp
            .content_length()
            .is_some_and(|n| n as usize > MAX_ANSWER_BYTES)
        {
            return Outcome::Unavailable("the GraphQL endpoint's answer is too large".into());
        }
        let bytes = match resp.bytes().await {
            Ok(b) if b.len() <= MAX_ANSWER_BYTES => b,
            Ok(_) => {
                return Outcome::Unavailable("the GraphQL endpoint's answer is too large".into())
            }
            Err(_) => {
                return Outcome::Unavailable("the GraphQL endpoint's answer was cut short".into())
            }
        };
        interpret(status, &bytes)
    }
}

/// What an answer with `status` and `body` makes of the operation.
pub(crate) fn interpret(status: u16, body: &[u8]) -> Outcome {
    let unavailable = || {
        Outcome::Unavailable(format!(
            "the GraphQL endpoint answered {status} without a GraphQL result"
        ))
    };
    let Ok(mut answer) = serde_json::from_slice::<Map<String, Value>>(body) else {
        return unavailable();
    };
    let has_data = answer.contains_key("data");
    let errors = answer.get("errors").filter(|e| e.is_array()).cloned();
    if !has_data {
        return match errors {
            Some(errors) => Outcome::Errors(raw(&errors.to_string())),
            None => unavailable(),
        };
    }
    if !(200..300).contains(&status) && errors.is_none() {
        return unavailable();
    }
    // The gateway's extension is for it alone.
    let mut ext = None;
    if let Some(Value::Object(exts)) = answer.get_mut("extensions") {
        ext = exts.remove(gql::EXTENSION);
        if exts.is_empty() {
            answer.remove("extensions");
        }
    }
    let subscription = ext
        .as_ref()
        .and_then(|e| e.get("subscription"))
        .cloned()
        .map(serde_json::from_value::<SubscriptionExt>);
    let payload = || raw(&Value::Object(answer.clone()).to_string());
    match subscription {
        None => Outcome::Result(payload()),
        Some(Err(e)) => Outcome::Unavailable(format!(
            "the GraphQL endpoint's `extensions.switchboard.subscription` is not valid: {e}"
        )),
        Some(Ok(ext)) => {
            if let Err(why) = check_ext(&ext) {
                return Outcome::Unavailable(why);
            }
            let no_initial = answer.get("data").is_some_and(Value::is_null) && errors.is_none();
            Outcome::Subscription {
                initial: (!no_initial).then(payload),
                ext,
            }
        }
    }
}

fn check_ext(ext: &SubscriptionExt) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "the GraphQL endpoint's subscription extension: {why}"
        ))
    };
    if ext.triggers.is_empty() || ext.triggers.len() > gql::MAX_TRIGGERS {
        return bad("`triggers` must hold 1 to 32 keys");
    }
    if ext
        .triggers
        .iter()
        .any(|t| t.is_empty() || t.len() > gql::MAX_TRIGGER_LEN)
    {
        return bad("a trigger key must be 1 to 256 bytes");
    }
    if ext
        .digest
        .as_ref()
        .is_some_and(|d| d.is_empty() || d.len() > gql::MAX_DIGEST_LEN)
    {
        return bad("`digest` must be 1 to 128 bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert!(
            matches!(interpret(200, br#"{"data":{"a":1}}"#), Outcome::Result(p) if p.get() == r#"{"data":{"a":1}}"#)
        );
        assert!(matches!(
            interpret(400, br#"{"errors":[{"message":"x"}]}"#),
            Outcome::Errors(_)
        ));
        assert!(matches!(
            interpret(502, b"bad gateway"),
            Outcome::Unavailable(_)
        ));
        assert!(matches!(
            interpret(500, br#"{"data":null}"#),
            Outcome::Unavailable(_)
        ));
        let sub = interpret(
            200,
            br#"{"data":{"n":1},"extensions":{"switchboard":{"subscription":{"triggers":["t"],"digest":"d"}},"x":1}}"#,
        );
        let Outcome::Subscription { initial, ext } = sub else {
            panic!("{sub:?}")
        };
        assert_eq!(
            initial.unwrap().get(),
            r#"{"data":{"n":1},"extensions":{"x":1}}"#
        );
        assert_eq!(ext.triggers, ["t"]);
        let none = interpret(
            200,
            br#"{"data":null,"extensions":{"switchboard":{"subscription":{"triggers":["t"]}}}}"#,
        );
        assert!(matches!(none, Outcome::Subscription { initial: None, .. }));
        let bad = interpret(
            200,
            br#"{"data":null,"extensions":{"switchboard":{"subscription":{"triggers":[]}}}}"#,
        );
        assert!(matches!(bad, Outcome::Unavailable(_)));
    }
}
