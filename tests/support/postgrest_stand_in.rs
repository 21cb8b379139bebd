//! A real HTTP server standing in for Supabase's REST API (its API gateway and PostgREST),
//! following `integrations.md` §1.8 and PostgREST's query grammar:
//!
//! - `GET /rest/v1/{table}?{column}=eq.{value}&select=*&limit=N` answers a JSON array of the
//!   matching rows (`[]` when none). The query string is decoded as PostgREST decodes it (`+` is
//!   a space), and a filter value is everything after `eq.`, verbatim, as in PostgREST's
//!   `pSingleVal`: quotes would be part of the value.
//! - Keys: `apikey` must be the project's key (else 401 `Invalid API key`). A JWT key must also
//!   come as `Authorization: Bearer <key>`. An `sb_secret_` key is refused (401) with a
//!   browser-like `User-Agent`, and with any `Authorization` header (it is not a JWT).
//! - `Accept-Profile` picks the schema (406 `PGRST106` when it is not exposed); an unknown table
//!   is 404 (`PGRST205`, or the older `42P01` shape); an unknown column 400 `42703`; a value
//!   that is not a number for a numeric column 400 `22P02`, quoting the value as Postgres does.
//!
//! It records every request so tests can assert headers, and can be slowed down.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// How an unknown table is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownTable {
    /// PostgREST 12 and later: 404 `PGRST205` "Could not find the table … in the schema cache".
    SchemaCache,
    /// Older PostgREST: 404 `42P01` "relation … does not exist".
    Relation,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path (`/rest/v1/leads`).
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// What the stand-in answered.
    pub status: u16,
}

impl Received {
    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Inner {
    key: String,
    /// `schema` → `table` → rows.
    schemas: BTreeMap<String, BTreeMap<String, Vec<Value>>>,
    unknown_table: UnknownTable,
    latency: Duration,
    requests: Vec<Received>,
}

/// Handle to a running stand-in.
#[derive(Clone)]
pub struct PostgrestStandIn {
    /// `http://127.0.0.1:PORT` (the project URL, without `/rest/v1`).
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl PostgrestStandIn {
    /// Starts a stand-in for a project whose key is `key` (a JWT or an `sb_secret_` key), with
    /// an empty `public` schema.
    pub async fn start(key: &str) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            key: key.to_owned(),
            schemas: BTreeMap::from([("public".to_owned(), BTreeMap::new())]),
            unknown_table: UnknownTable::SchemaCache,
            latency: Duration::ZERO,
            requests: Vec::new(),
        }));
        let router = Router::new()
            .route("/rest/v1/{table}", get(read_table))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the PostgREST stand-in");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            url: format!("http://{addr}"),
            inner,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates (or replaces) `table` in `public` with these rows (JSON objects).
    pub fn insert_table(&self, table: &str, rows: Vec<Value>) {
        self.insert_table_in("public", table, rows);
    }

    /// Creates (or replaces) `table` in `schema`, exposing the schema.
    pub fn insert_table_in(&self, schema: &str, table: &str, rows: Vec<Value>) {
        self.lock()
            .schemas
            .entry(schema.to_owned())
            .or_default()
            .insert(table.to_owned(), rows);
    }

    /// How unknown tables are reported.
    pub fn set_unknown_table(&self, shape: UnknownTable) {
        self.lock().unknown_table = shape;
    }

    /// Delays every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.lock().requests.clone()
    }
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn postgrest_error(status: StatusCode, code: &str, message: &str, hint: Option<&str>) -> Response {
    error(
        status,
        json!({ "code": code, "details": null, "hint": hint, "message": message }),
    )
}

/// The API gateway's and PostgREST's key checks (§1.8).
fn check_key(key: &str, headers: &HeaderMap) -> Option<Response> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(apikey) = header("apikey") else {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            json!({ "message": "No API key found in request",
                    "hint": "No `apikey` request header or url param was found." }),
        ));
    };
    if apikey != key {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            json!({ "message": "Invalid API key",
                    "hint": "Double check your Supabase `anon` or `service_role` API key." }),
        ));
    }
    if key.starts_with("sb_secret_") {
        let user_agent = header("user-agent").unwrap_or("");
        if user_agent.contains("Mozilla/") {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                json!({ "message": "Forbidden use of secret API key in browser" }),
            ));
        }
        if headers.contains_key("authorization") {
            // Not a JWT: the database layer cannot verify it.
            return Some(postgrest_error(
                StatusCode::UNAUTHORIZED,
                "PGRST301",
                "Expected 3 parts in JWT; got 1",
                None,
            ));
        }
    } else if header("authorization") != Some(format!("Bearer {key}").as_str()) {
        return Some(postgrest_error(
            StatusCode::UNAUTHORIZED,
            "PGRST302",
            "Anonymous access is disabled",
            None,
        ));
    }
    None
}

/// A JSON value as Postgres would print it for comparison with a filter value.
fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn answer(inner: &Inner, table: &str, uri: &Uri, headers: &HeaderMap) -> Response {
    if let Some(refusal) = check_key(&inner.key, headers) {
        return refusal;
    }
    let schema = headers
        .get("accept-profile")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("public");
    let Some(tables) = inner.schemas.get(schema) else {
        let exposed: Vec<&str> = inner.schemas.keys().map(String::as_str).collect();
        return postgrest_error(
            StatusCode::NOT_ACCEPTABLE,
            "PGRST106",
            &format!(
                "The schema must be one of the following: {}",
                exposed.join(", ")
            ),
            None,
        );
    };
    let Some(rows) = tables.get(table) else {
        return match inner.unknown_table {
            UnknownTable::SchemaCache => postgrest_error(
                StatusCode::NOT_FOUND,
                "PGRST205",
                &format!("Could not find the table '{schema}.{table}' in the schema cache"),
                None,
            ),
            UnknownTable::Relation => postgrest_error(
                StatusCode::NOT_FOUND,
                "42P01",
                &format!("relation \"{schema}.{table}\" does not exist"),
                None,
            ),
        };
    };

    // PostgREST decodes the query with `+` as a space, then reads each parameter.
    let mut filters = Vec::new();
    let mut limit = usize::MAX;
    for (key, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "select" => {
                if value != "*" {
                    return postgrest_error(
                        StatusCode::BAD_REQUEST,
                        "PGRST100",
                        "the stand-in only supports select=*",
                        None,
                    );
                }
            }
            "limit" => match value.parse() {
                Ok(n) => limit = n,
                Err(_) => {
                    return postgrest_error(
                        StatusCode::BAD_REQUEST,
                        "PGRST100",
                        "\"failed to parse limit parameter\"",
                        None,
                    )
                }
            },
            column => {
                if column.contains('.') {
                    return postgrest_error(
                        StatusCode::BAD_REQUEST,
                        "PGRST100",
                        "the stand-in does not support embedded filters",
                        None,
                    );
                }
                // `op.value`: the operator runs to the first `.`; the value is the rest,
                // verbatim (PostgREST's `pSingleVal = many anyChar`).
                let Some((operator, operand)) = value.split_once('.') else {
                    return postgrest_error(
                        StatusCode::BAD_REQUEST,
                        "PGRST100",
                        &format!("\"failed to parse filter ({value})\" (line 1, column 1)"),
                        None,
                    );
                };
                if operator != "eq" {
                    return postgrest_error(
                        StatusCode::BAD_REQUEST,
                        "PGRST100",
                        &format!("the stand-in only supports eq, got {operator}"),
                        None,
                    );
                }
                filters.push((column.to_owned(), operand.to_owned()));
            }
        }
    }
    for (column, operand) in &filters {
        let known = rows.iter().any(|row| row.get(column).is_some());
        if !known && !rows.is_empty() {
            return postgrest_error(
                StatusCode::BAD_REQUEST,
                "42703",
                &format!("column {table}.{column} does not exist"),
                None,
            );
        }
        let numeric = rows.iter().any(|row| row[column].is_number());
        if numeric && operand.parse::<f64>().is_err() {
            return postgrest_error(
                StatusCode::BAD_REQUEST,
                "22P02",
                &format!("invalid input syntax for type bigint: \"{operand}\""),
                None,
            );
        }
    }
    let matching: Vec<Value> = rows
        .iter()
        .filter(|row| {
            filters
                .iter()
                .all(|(column, operand)| as_text(&row[column]).as_deref() == Some(operand))
        })
        .take(limit)
        .cloned()
        .collect();
    Json(Value::Array(matching)).into_response()
}

async fn read_table(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(table): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let (latency, response) = {
        let mut state = inner.lock().unwrap_or_else(|e| e.into_inner());
        let response = answer(&state, &table, &uri, &headers);
        state.requests.push(Received {
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers,
            status: response.status().as_u16(),
        });
        (state.latency, response)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    response
}
