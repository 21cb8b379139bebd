//! The one HTTP client that talks to the Graph API. The access token travels in the request
//! body (POST) or the `Authorization` header (GET), never in a URL, and is never logged.

use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};

use super::batch::{appsecret_proof, build_body, RequestFields};
use super::classify::{classify, classify_transport_failure, GraphAnswer, GraphError, Verdict};
use crate::config::{Config, MetaConfig};

/// A Graph API client bound to one pixel.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    events_url: String,
    pixel_url: String,
    dataset_quality_url: String,
    meta: MetaConfig,
    appsecret_proof: Option<String>,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClient")
            .field("events_url", &self.events_url)
            .finish_non_exhaustive()
    }
}

impl GraphClient {
    /// Builds the client (connection pool, timeouts, rustls).
    ///
    /// # Errors
    /// When the TLS backend cannot be initialised.
    pub fn new(config: &Config, meta: &MetaConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("capi-bridge/", env!("CARGO_PKG_VERSION")))
            .timeout(config.delivery.request_timeout)
            .connect_timeout(config.delivery.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        let pixel_url = format!(
            "{}/{}/{}",
            config.graph_url, meta.api_version, meta.pixel_id
        );
        Ok(Self {
            http,
            events_url: format!("{pixel_url}/events"),
            dataset_quality_url: format!(
                "{}/{}/dataset_quality",
                config.graph_url, config.api_version
            ),
            pixel_url,
            appsecret_proof: meta
                .app_secret
                .as_deref()
                .map(|secret| appsecret_proof(secret, &meta.access_token)),
            meta: meta.clone(),
        })
    }

    /// The pixel this client sends to.
    pub fn pixel_id(&self) -> &str {
        &self.meta.pixel_id
    }

    /// The pixel's configured name.
    pub fn pixel_name(&self) -> &str {
        &self.meta.name
    }

    /// Sends one request of events and classifies Meta's answer.
    pub async fn send_events<'p>(
        &self,
        payloads: impl IntoIterator<Item = &'p str>,
        n_events: usize,
        test_event_code: Option<&str>,
    ) -> Verdict {
        let body = build_body(
            payloads,
            &RequestFields {
                access_token: &self.meta.access_token,
                appsecret_proof: self.appsecret_proof.as_deref(),
                test_event_code: test_event_code.or(self.meta.test_event_code.as_deref()),
            },
        );
        let response = self
            .http
            .post(&self.events_url)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(err) => return classify_transport_failure(&describe(&err)),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        match response.bytes().await {
            Ok(bytes) => classify(&answer(status, &bytes, &headers), n_events),
            Err(err) => classify_transport_failure(&describe(&err)),
        }
    }

    /// A harmless read of the pixel (`GET /{pixel}?fields=id,name`) that proves the token can
    /// reach it. Returns the pixel's name.
    ///
    /// # Errors
    /// Meta's error, or a transport failure described in [`GraphError::message`].
    pub async fn check_pixel(&self) -> Result<String, GraphError> {
        let value = self
            .get_json(&self.pixel_url, &[("fields", "id,name")])
            .await?;
        Ok(value
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("(no name)")
            .to_owned())
    }

    /// Meta's own Event Match Quality of this pixel's web events, from the Dataset Quality API
    /// (`GET /{version}/dataset_quality`, `meta-capi.md` §9). Needs `ads_read` and
    /// (`ads_management` or `business_management`); without them Meta answers code 10 or 200.
    ///
    /// # Errors
    /// Meta's error, or a transport failure described in [`GraphError::message`].
    pub async fn dataset_quality(&self) -> Result<Vec<MetaEventQuality>, GraphError> {
        let value = self
            .get_json(
                &self.dataset_quality_url,
                &[
                    ("dataset_id", self.meta.pixel_id.as_str()),
                    ("agent_name", super::batch::PARTNER_AGENT),
                    ("fields", "web{event_match_quality,event_name}"),
                ],
            )
            .await?;
        Ok(MetaEventQuality::from_answer(&value))
    }

    /// A GET with the token in the `Authorization` header (never the URL); the JSON answer.
    async fn get_json(
        &self,
        url: &str,
        query: &[(&str, &str)],
    ) -> Result<serde_json::Value, GraphError> {
        let mut request = self
            .http
            .get(url)
            .bearer_auth(&self.meta.access_token)
            .query(query);
        if let Some(proof) = &self.appsecret_proof {
            request = request.query(&[("appsecret_proof", proof)]);
        }
        let response = request.send().await.map_err(|err| GraphError {
            message: describe(&err),
            ..GraphError::default()
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|err| GraphError {
            message: describe(&err),
            ..GraphError::default()
        })?;
        if (200..300).contains(&status) {
            return Ok(serde_json::from_slice(&bytes).unwrap_or_default());
        }
        match classify(&answer(status, &bytes, &headers), 0) {
            Verdict::Retry { error, .. }
            | Verdict::Rejected { error }
            | Verdict::Pause { error } => Err(error),
            Verdict::Delivered { .. } => Err(GraphError {
                http_status: Some(status),
                message: "unexpected answer".to_owned(),
                ..GraphError::default()
            }),
        }
    }
}

/// Meta's Event Match Quality of one event name (Dataset Quality API).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct MetaEventQuality {
    /// Event name.
    pub event_name: String,
    /// EMQ, 0 to 10.
    pub composite_score: Option<f64>,
    /// Per identifier, the share of events carrying it as Meta saw them.
    pub match_key_coverage: Vec<KeyCoverage>,
}

/// How many events carried one identifier, as Meta saw them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct KeyCoverage {
    /// `email`, `phone`, `external_id`, `ip_address`, `user_agent`, `fbc`, …
    pub identifier: String,
    /// Percent of events, 0 to 100.
    pub percentage: f64,
}

impl MetaEventQuality {
    /// Reads `{"web": [{"event_name", "event_match_quality": {"composite_score",
    /// "match_key_feedback": [{"identifier", "coverage": {"percentage"}}]}}]}`; entries without
    /// an event name are skipped.
    fn from_answer(value: &serde_json::Value) -> Vec<Self> {
        let entries = value
            .get("web")
            .and_then(|w| w.as_array())
            .map(Vec::as_slice)
            .unwrap_or_default();
        entries
            .iter()
            .filter_map(|entry| {
                let event_name = entry.get("event_name")?.as_str()?.to_owned();
                let emq = entry.get("event_match_quality");
                let composite_score = emq
                    .and_then(|e| e.get("composite_score"))
                    .and_then(serde_json::Value::as_f64);
                let match_key_coverage = emq
                    .and_then(|e| e.get("match_key_feedback"))
                    .and_then(|f| f.as_array())
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|key| {
                        let identifier = key.get("identifier")?.as_str()?.to_owned();
                        let percentage = key.get("coverage")?.get("percentage")?.as_f64()?;
                        Some(KeyCoverage {
                            identifier,
                            percentage,
                        })
                    })
                    .collect();
                Some(Self {
                    event_name,
                    composite_score,
                    match_key_coverage,
                })
            })
            .collect()
    }
}

fn answer<'a>(status: u16, body: &'a [u8], headers: &'a HeaderMap) -> GraphAnswer<'a> {
    GraphAnswer {
        status,
        body,
        retry_after_secs: headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok()),
        business_use_case_usage: headers
            .get("x-business-use-case-usage")
            .and_then(|v| v.to_str().ok()),
    }
}

/// A transport error without the URL (it holds only the pixel id, but keep logs lean).
fn describe(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_body() || err.is_decode() {
        "broken response body"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(err);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {detail}")
    }
}
