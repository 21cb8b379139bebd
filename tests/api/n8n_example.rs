//! The importable n8n workflow in `examples/n8n/` is a workflow whose HTTP Request node posts
//! to `/v1/events` with Header Auth, and the body it sends (its n8n expressions replaced by what
//! n8n would render for a sample lead) is accepted by the real service.

use serde_json::{json, Value};

use crate::helpers::{spawn_app, SECRET};

const WORKFLOW: &str = include_str!("../../examples/n8n/capi-bridge-lead.json");

/// What n8n renders for each expression of the example when its webhook received `lead`
/// (`$json.body`); `None` for an expression this table does not know.
fn rendered(expression: &str, lead: &Value) -> Option<String> {
    // JavaScript's `||`: a falsy field (missing, null, "", 0, false) takes the fallback.
    let field = |name: &str| {
        lead.get(name)
            .filter(|v| !matches!(v, Value::Null | Value::Bool(false)))
            .filter(|v| v.as_str() != Some("") && v.as_f64() != Some(0.0))
            .cloned()
    };
    let value = match expression {
        "JSON.stringify($json.body.id ? 'lead-' + $json.body.id : $execution.id + '-' + $itemIndex)" => {
            match field("id") {
                Some(Value::String(id)) => json!(format!("lead-{id}")),
                Some(id) => json!(format!("lead-{id}")),
                // $execution.id + '-' + $itemIndex
                None => json!("7301-0"),
            }
        }
        "JSON.stringify($json.body.email || null)" => field("email").unwrap_or(Value::Null),
        "JSON.stringify($json.body.phone || null)" => field("phone").unwrap_or(Value::Null),
        "JSON.stringify($json.body.first_name || null)" => {
            field("first_name").unwrap_or(Value::Null)
        }
        "JSON.stringify($json.body.value || null)" => field("value").unwrap_or(Value::Null),
        "JSON.stringify($json.body.currency || 'BRL')" => {
            field("currency").unwrap_or(json!("BRL"))
        }
        _ => return None,
    };
    Some(value.to_string())
}

/// Replaces every `{{ … }}` of an n8n template; panics on an expression the table lacks.
fn render(template: &str, lead: &Value) -> Value {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("closed expression") + start;
        let expression = rest[start + 2..end].trim();
        out.push_str(
            &rendered(expression, lead)
                .unwrap_or_else(|| panic!("no sample value for the expression {expression:?}")),
        );
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    serde_json::from_str(&out)
        .unwrap_or_else(|err| panic!("rendered body is not JSON ({err}): {out}"))
}

fn template(workflow: &Value) -> &str {
    node(workflow, "n8n-nodes-base.httpRequest")["parameters"]["jsonBody"]
        .as_str()
        .expect("jsonBody")
        .strip_prefix('=')
        .expect("an expression")
}

fn node<'a>(workflow: &'a Value, node_type: &str) -> &'a Value {
    workflow["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["type"] == node_type)
        .unwrap_or_else(|| panic!("no {node_type} node"))
}

#[test]
fn the_example_is_an_n8n_workflow_posting_to_v1_events_with_header_auth() {
    let workflow: Value = serde_json::from_str(WORKFLOW).expect("the example is JSON");
    assert!(workflow["name"].as_str().is_some_and(|n| !n.is_empty()));
    for node in workflow["nodes"].as_array().expect("nodes") {
        for key in [
            "id",
            "name",
            "type",
            "typeVersion",
            "position",
            "parameters",
        ] {
            assert!(!node[key].is_null(), "node {} lacks {key}", node["name"]);
        }
    }

    let trigger = node(&workflow, "n8n-nodes-base.webhook");
    assert_eq!(trigger["parameters"]["httpMethod"], "POST");
    let http = node(&workflow, "n8n-nodes-base.httpRequest");
    assert_eq!(http["typeVersion"], 4.2);
    let parameters = &http["parameters"];
    assert_eq!(parameters["method"], "POST");
    assert!(parameters["url"]
        .as_str()
        .expect("url")
        .ends_with("/v1/events"));
    assert_eq!(parameters["authentication"], "genericCredentialType");
    assert_eq!(parameters["genericAuthType"], "httpHeaderAuth");
    assert!(http["credentials"]["httpHeaderAuth"]["name"].is_string());
    assert_eq!(parameters["sendBody"], true);
    assert_eq!(parameters["specifyBody"], "json");
    assert!(parameters["jsonBody"]
        .as_str()
        .expect("jsonBody")
        .starts_with('='));
    assert_eq!(http["retryOnFail"], true);

    // The trigger feeds the HTTP Request node.
    let next = &workflow["connections"][trigger["name"].as_str().expect("name")]["main"][0][0];
    assert_eq!(next["node"], http["name"]);
    assert_eq!(workflow["settings"]["executionOrder"], "v1");
}

#[tokio::test]
async fn the_body_the_example_sends_is_accepted_and_a_retry_is_a_duplicate() {
    // Arrange: the body n8n would send for a lead, from the example's own template.
    let workflow: Value = serde_json::from_str(WORKFLOW).expect("the example is JSON");
    // A quote in a name: JSON.stringify keeps the body valid JSON.
    let lead = json!({"id": 42, "email": "Ana@Example.com ", "phone": "+55 11 98765-4321",
                      "first_name": "Ana \"Nana\"", "value": "19.90"});
    let body = render(template(&workflow), &lead);
    let app = spawn_app().await;

    // Act: as the Header Auth credential sends it (Name `Authorization`, Value `Bearer …`).
    let first = app
        .http
        .post(format!("{}/v1/events", app.address))
        .header("authorization", format!("Bearer {SECRET}"))
        .json(&body)
        .send()
        .await
        .expect("request");
    let first_status = first.status();
    let first: Value = first.json().await.expect("json");
    // Retry On Fail (or a re-run) sends the same body again.
    let again = app
        .http
        .post(format!("{}/v1/events", app.address))
        .header("x-api-key", SECRET)
        .json(&body)
        .send()
        .await
        .expect("request");
    let again_status = again.status();
    let again: Value = again.json().await.expect("json");

    // Assert
    assert_eq!(first_status, 202, "{first}");
    assert_eq!(first["accepted"], 1, "{first}");
    assert_eq!(first["events"][0]["event_id"], "lead-42");
    // Every field of the example is one the service knows: nothing was dropped.
    assert_eq!(first["warnings"], json!([]), "{first}");
    assert_eq!(again_status, 202, "{again}");
    assert_eq!(again["duplicates"], 1, "{again}");
    assert_eq!(again["events"][0]["status"], "duplicate");

    // What goes to Meta: hashed, with the value and currency of the lead.
    let accepted = app.graph.wait_for_accepted(1, crate::helpers::WAIT).await;
    let event = &accepted[0];
    assert_eq!(event["event_id"], "lead-42");
    assert_eq!(event["action_source"], "other");
    assert_eq!(
        event["user_data"]["em"],
        json!([crate::helpers::sha256("ana@example.com")])
    );
    assert_eq!(
        event["user_data"]["ph"],
        json!([crate::helpers::sha256("5511987654321")])
    );
    assert_eq!(event["custom_data"]["value"], 19.9);
    assert_eq!(event["custom_data"]["currency"], "BRL");
    assert_eq!(event["custom_data"]["source"], "n8n");
}

#[tokio::test]
async fn a_lead_with_missing_fields_still_goes_without_warnings() {
    // Missing fields render as null, which the service ignores.
    let workflow: Value = serde_json::from_str(WORKFLOW).expect("the example is JSON");
    let lead = json!({"id": "b7c1-uuid", "email": "joao@example.com"});
    let body = render(template(&workflow), &lead);
    assert_eq!(body["phone"], Value::Null);
    let app = spawn_app().await;

    let response = app.post_events(&body).await;

    let status = response.status();
    let answer: Value = response.json().await.expect("json");
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["events"][0]["event_id"], "lead-b7c1-uuid");
    assert_eq!(answer["warnings"], json!([]), "{answer}");
}
