//! Chatwoot payloads put the same things in different places depending on the event
//! (`integrations.md` §2.3): the contact is `meta.sender` on conversation events,
//! `conversation.meta.sender` on message events, the body itself on contact events. These
//! derived variables let a rule say `contact.email` whatever the event.

use serde_json::{json, Value};

/// Variables bound for rules of Chatwoot sources, besides the payload's own keys.
pub const DERIVED: [&str; 7] = [
    "contact",
    "conversation",
    "conversation_key",
    "labels_added",
    "ctwa_clid",
    "messaging_channel",
    "has_contact_info",
];

/// The derived variables of one payload, in the order of [`DERIVED`]. Missing things are
/// `null` (an empty list for `labels_added`), never an error.
pub fn derived(payload: &Value) -> Vec<(&'static str, Value)> {
    let event = payload.get("event").and_then(Value::as_str).unwrap_or("");
    let conversation = conversation_of(event, payload);
    let contact = contact_of(event, payload, conversation);
    let key = conversation.map_or(Value::Null, |c| conversation_key(payload, c));
    let labels_added = Value::Array(labels_added(event, payload, conversation));
    let ctwa = conversation.map_or(Value::Null, |c| ctwa_clid(c, contact));
    let channel = conversation
        .and_then(|c| c.get("channel").or_else(|| payload.get("channel")))
        .and_then(Value::as_str)
        .and_then(messaging_channel)
        .map_or(Value::Null, |c| Value::String(c.to_owned()));
    let has_contact_info = contact.is_some_and(|c| {
        ["email", "phone_number"].iter().any(|k| {
            c.get(*k)
                .and_then(Value::as_str)
                .is_some_and(|v| !v.trim().is_empty())
        })
    });
    vec![
        ("contact", contact.cloned().unwrap_or(Value::Null)),
        ("conversation", conversation.cloned().unwrap_or(Value::Null)),
        ("conversation_key", key),
        ("labels_added", labels_added),
        ("ctwa_clid", ctwa),
        ("messaging_channel", channel),
        ("has_contact_info", Value::Bool(has_contact_info)),
    ]
}

fn conversation_of<'a>(event: &str, payload: &'a Value) -> Option<&'a Value> {
    if event.starts_with("conversation_") && !event.starts_with("conversation_typing")
        || event.starts_with("automation_event.")
    {
        return Some(payload);
    }
    if event.starts_with("contact_") {
        return None;
    }
    payload
        .get("conversation")
        .or_else(|| payload.get("current_conversation"))
        .filter(|c| c.is_object())
}

fn contact_of<'a>(
    event: &str,
    payload: &'a Value,
    conversation: Option<&'a Value>,
) -> Option<&'a Value> {
    if event.starts_with("contact_") {
        return Some(payload);
    }
    let sender_contact = |v: &'a Value| {
        v.get("sender")
            .filter(|s| s.get("type").and_then(Value::as_str) == Some("contact"))
    };
    conversation
        .and_then(|c| c.pointer("/meta/sender"))
        .filter(|s| s.is_object())
        .or_else(|| payload.get("contact").filter(|c| c.is_object()))
        .or_else(|| sender_contact(payload))
}

/// `a<account>-c<display id>`; the display id is only unique within an account, so the inbox
/// stands in when an old Chatwoot sends no account.
fn conversation_key(payload: &Value, conversation: &Value) -> Value {
    let Some(id) = conversation.get("id").and_then(scalar) else {
        return Value::Null;
    };
    let account = payload
        .pointer("/account/id")
        .or_else(|| conversation.get("account_id"))
        .or_else(|| conversation.pointer("/account/id"))
        .and_then(scalar);
    let inbox = conversation
        .get("inbox_id")
        .or_else(|| payload.pointer("/inbox/id"))
        .and_then(scalar);
    Value::String(match (account, inbox) {
        (Some(account), _) => format!("a{account}-c{id}"),
        (None, Some(inbox)) => format!("i{inbox}-c{id}"),
        (None, None) => format!("c{id}"),
    })
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Labels present now that were not before: from `changed_attributes.label_list` on
/// `conversation_updated`; every label on a new conversation and on automation events (the
/// automation's own conditions decided that it is time).
fn labels_added(event: &str, payload: &Value, conversation: Option<&Value>) -> Vec<Value> {
    let changed = payload
        .get("changed_attributes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|change| change.get("label_list"));
    if let Some(change) = changed {
        let list = |key: &str| -> Vec<Value> {
            change
                .get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let before = list("previous_value");
        return list("current_value")
            .into_iter()
            .filter(|label| !before.contains(label))
            .collect();
    }
    if event == "conversation_created" || event.starts_with("automation_event.") {
        return conversation
            .and_then(|c| c.get("labels"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
    }
    Vec::new()
}

/// The Click-to-WhatsApp click id, where integrations keep it: the conversation's
/// `additional_attributes.referral` (as WhatsApp's webhook names it) or a `ctwa_clid`
/// custom attribute of the conversation or contact.
fn ctwa_clid(conversation: &Value, contact: Option<&Value>) -> Value {
    [
        conversation.pointer("/additional_attributes/referral/ctwa_clid"),
        conversation.pointer("/custom_attributes/ctwa_clid"),
        contact.and_then(|c| c.pointer("/custom_attributes/ctwa_clid")),
    ]
    .into_iter()
    .flatten()
    .find_map(|v| v.as_str().filter(|s| !s.trim().is_empty()))
    .map_or(Value::Null, |s| json!(s.trim()))
}

fn messaging_channel(channel: &str) -> Option<&'static str> {
    match channel {
        "Channel::Whatsapp" => Some("whatsapp"),
        "Channel::FacebookPage" => Some("messenger"),
        "Channel::Instagram" => Some("instagram"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Value {
        let path = format!("{}/tests/samples/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("sample exists");
        serde_json::from_str(&text).expect("sample parses")
    }

    fn get(payload: &Value, name: &str) -> Value {
        derived(payload)
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("derived")
    }

    #[test]
    fn the_contact_is_found_wherever_each_event_carries_it() {
        for file in [
            "chatwoot-conversation_status_changed.json",
            "chatwoot-conversation_opened.json",
            "chatwoot-conversation_resolved.json",
            "chatwoot-message_created.json",
            "chatwoot-message_updated.json",
            "chatwoot-message_created-api_channel.json",
            "chatwoot-webwidget_triggered.json",
        ] {
            let payload = sample(file);
            let contact = get(&payload, "contact");
            assert!(contact.get("id").is_some(), "{file}: {contact}");
        }
        let contact_event = json!({"event": "contact_created", "id": 5,
            "email": "a@b.co", "phone_number": "+5511999990000", "account": {"id": 1}});
        assert_eq!(get(&contact_event, "contact")["id"], 5);
        assert_eq!(get(&contact_event, "has_contact_info"), true);
        assert_eq!(get(&contact_event, "conversation"), Value::Null);
    }

    #[test]
    fn message_events_read_the_nested_conversation() {
        let payload = sample("chatwoot-message_created.json");
        let conversation = get(&payload, "conversation");
        assert_eq!(conversation, payload["conversation"]);
        let key = get(&payload, "conversation_key");
        let account = &payload["account"]["id"];
        let id = &payload["conversation"]["id"];
        assert_eq!(key, json!(format!("a{account}-c{id}")));
    }

    #[test]
    fn labels_added_come_from_the_label_list_change() {
        let payload = json!({"event": "conversation_updated", "id": 7, "labels": ["hot", "lead"],
            "changed_attributes": [{"label_list": {"previous_value": ["hot"], "current_value": ["hot", "lead"]}}]});
        assert_eq!(get(&payload, "labels_added"), json!(["lead"]));
        let removed = json!({"event": "conversation_updated", "id": 7,
            "changed_attributes": [{"label_list": {"previous_value": ["lead"], "current_value": []}}]});
        assert_eq!(get(&removed, "labels_added"), json!([]));
        let automation =
            json!({"event": "automation_event.conversation_updated", "id": 7, "labels": ["paid"]});
        assert_eq!(get(&automation, "labels_added"), json!(["paid"]));
        let status = json!({"event": "conversation_status_changed", "id": 7, "labels": ["paid"]});
        assert_eq!(get(&status, "labels_added"), json!([]));
    }

    #[test]
    fn click_to_whatsapp_conversations_carry_their_click_id_and_channel() {
        let payload = json!({"event": "conversation_created", "id": 7, "channel": "Channel::Whatsapp",
            "additional_attributes": {"referral": {"ctwa_clid": "ARAkLkA8rmlFeiCktEJQ"}}});
        assert_eq!(get(&payload, "ctwa_clid"), "ARAkLkA8rmlFeiCktEJQ");
        assert_eq!(get(&payload, "messaging_channel"), "whatsapp");
        assert_eq!(get(&payload, "conversation_key"), "c7");
        let widget = sample("chatwoot-conversation_status_changed.json");
        assert_eq!(get(&widget, "ctwa_clid"), Value::Null);
        assert_eq!(get(&widget, "messaging_channel"), Value::Null);
    }
}
