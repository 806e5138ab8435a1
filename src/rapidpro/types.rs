//! Typed RapidPro API v2 requests and responses.
//!
//! Owns the serde shapes of what the connector reads from and writes to
//! RapidPro (`shared/reference/rapidpro-api.md` §5): the cursor page
//! envelope, contacts, groups, fields, contact actions, the workspace,
//! flows, flow starts, broadcasts, messages and runs.
//!
//! Reading is lenient: unknown keys are ignored, missing keys take their
//! default, a value of an unexpected type becomes the default instead of
//! failing the whole page, and status vocabularies keep values they do not
//! know in an `Other(String)` variant. Datetimes are parsed in both forms
//! RapidPro writes (`…Z` and `…+00:00`, with or without a fraction).
//! Write bodies only carry the keys that are set, because RapidPro changes
//! exactly the keys present in an update.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Parse a RapidPro datetime (`2015-11-11T13:05:57.457742Z`,
/// `2015-11-11T08:30:24.922024+00:00`, `2013-03-02T17:28:12Z`, or with a
/// workspace offset such as `+02:00`) into UTC.
pub fn parse_datetime(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|dt| dt.with_timezone(&Utc))
}

/// Format a datetime the way RapidPro recommends for `before`/`after`
/// (`2016-10-13T11:54:32.525277Z`).
pub fn format_datetime(value: &DateTime<Utc>) -> String {
    value.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Deserialize `T`, or take `T::default()` when the value has another shape
/// (a page is not rejected for one odd value).
fn lenient<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = Value::deserialize(deserializer)?;
    Ok(T::deserialize(value).unwrap_or_default())
}

/// An optional datetime in either RapidPro form; unparseable is `None`.
fn lenient_datetime<'de, D>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error>
where
    D: Deserializer<'de>,
{
    let value = Value::deserialize(deserializer)?;
    Ok(value.as_str().and_then(parse_datetime))
}

/// A string, or a number or boolean written as text (older RapidPro and
/// the Python client's fixtures return numeric field values as numbers).
fn value_as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn lenient_text<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: Deserializer<'de>,
{
    let value = Value::deserialize(deserializer)?;
    Ok(value_as_text(&value))
}

/// Contact field values: every key kept, `null` (or a non-scalar) as `None`.
fn lenient_field_values<'de, D>(
    deserializer: D,
) -> Result<BTreeMap<String, Option<String>>, D::Error>
where
    D: Deserializer<'de>,
{
    let value = Value::deserialize(deserializer)?;
    let Value::Object(map) = value else {
        return Ok(BTreeMap::new());
    };
    Ok(map
        .into_iter()
        .map(|(key, value)| {
            let text = value_as_text(&value);
            (key, text)
        })
        .collect())
}

/// A closed vocabulary that keeps unknown values: `as_str` gives the wire
/// text back, serde reads and writes the wire text.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant,)+
            /// A value this client does not know (kept verbatim).
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Other(text) => text,
                }
            }

            pub fn parse(text: &str) -> Self {
                match text {
                    $($text => $name::$variant,)+
                    other => $name::Other(other.to_string()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Ok($name::parse(&text))
            }
        }
    };
}

vocabulary!(
    /// `contacts.status` (`null` for deleted contacts).
    ContactStatus {
        Active => "active",
        Blocked => "blocked",
        Stopped => "stopped",
        Archived => "archived",
    }
);

vocabulary!(
    /// `groups.status`.
    GroupStatus {
        Initializing => "initializing",
        Evaluating => "evaluating",
        Ready => "ready",
        Invalid => "invalid",
    }
);

vocabulary!(
    /// `fields.type` (the deprecated `value_type` uses `numeric`).
    FieldType {
        Text => "text",
        Number => "number",
        Datetime => "datetime",
        State => "state",
        District => "district",
        Ward => "ward",
    }
);

vocabulary!(
    /// `flows.type`.
    FlowType {
        Message => "message",
        Voice => "voice",
        Background => "background",
        Survey => "survey",
    }
);

vocabulary!(
    /// Status of a broadcast or a flow start (the docs' `complete` is
    /// kept as `Other`).
    JobStatus {
        Pending => "pending",
        Queued => "queued",
        Started => "started",
        Completed => "completed",
        Failed => "failed",
        Interrupted => "interrupted",
    }
);

vocabulary!(
    /// `messages.direction`.
    MessageDirection {
        In => "in",
        Out => "out",
    }
);

vocabulary!(
    /// `messages.status`.
    MessageStatus {
        Queued => "queued",
        Handled => "handled",
        Wired => "wired",
        Sent => "sent",
        Delivered => "delivered",
        Read => "read",
        Errored => "errored",
        Failed => "failed",
    }
);

vocabulary!(
    /// `messages.folder` filter.
    MessageFolder {
        Inbox => "inbox",
        Flows => "flows",
        Archived => "archived",
        Outbox => "outbox",
        Sent => "sent",
        Failed => "failed",
    }
);

vocabulary!(
    /// `runs.exit_type` (`null` while the run is active or waiting).
    ExitType {
        Completed => "completed",
        Interrupted => "interrupted",
        Expired => "expired",
        Failed => "failed",
    }
);

vocabulary!(
    /// `contact_actions.action`.
    ContactAction {
        Add => "add",
        Remove => "remove",
        Block => "block",
        Unblock => "unblock",
        Interrupt => "interrupt",
        ArchiveMessages => "archive_messages",
        Delete => "delete",
        Archive => "archive",
    }
);

/// The cursor page envelope `{"next", "previous", "results"}`. `next` and
/// `previous` are absolute URLs with an opaque cursor.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(bound(deserialize = "T: DeserializeOwned"))]
pub struct Page<T> {
    #[serde(default, deserialize_with = "lenient_text")]
    pub next: Option<String>,
    #[serde(default, deserialize_with = "lenient_text")]
    pub previous: Option<String>,
    #[serde(default = "Vec::new")]
    pub results: Vec<T>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page {
            next: None,
            previous: None,
            results: Vec::new(),
        }
    }
}

/// A reference to another object: `{"uuid", "name"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ObjectRef {
    #[serde(deserialize_with = "lenient")]
    pub uuid: String,
    #[serde(deserialize_with = "lenient")]
    pub name: Option<String>,
}

/// `contacts.notes[]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ContactNote {
    #[serde(deserialize_with = "lenient")]
    pub text: Option<String>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub created_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient")]
    pub created_by: Option<Value>,
}

/// A contact as read (`GET /contacts.json`, and the answer to writes).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Contact {
    #[serde(deserialize_with = "lenient")]
    pub uuid: String,
    #[serde(deserialize_with = "lenient")]
    pub name: Option<String>,
    /// `None` for deleted contacts.
    #[serde(deserialize_with = "lenient")]
    pub status: Option<ContactStatus>,
    #[serde(deserialize_with = "lenient")]
    pub language: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub urns: Vec<String>,
    #[serde(deserialize_with = "lenient")]
    pub groups: Vec<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub notes: Vec<ContactNote>,
    /// Every field visible to the token's user; unset fields are `None`.
    #[serde(deserialize_with = "lenient_field_values")]
    pub fields: BTreeMap<String, Option<String>>,
    /// The flow the contact is in, if any.
    #[serde(deserialize_with = "lenient")]
    pub flow: Option<ObjectRef>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub created_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub modified_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub last_seen_on: Option<DateTime<Utc>>,
    /// Deprecated by RapidPro; use `status`.
    #[serde(deserialize_with = "lenient")]
    pub blocked: Option<bool>,
    /// Deprecated by RapidPro; use `status`.
    #[serde(deserialize_with = "lenient")]
    pub stopped: Option<bool>,
}

/// Body of a contact create (`POST /contacts.json`) or update
/// (`?uuid=`/`?urn=`). Only the keys set are sent: on update `urns` and
/// `groups` replace the whole set, `fields` merges (a `None` value clears
/// that field), and `note` is applied on update only. With `?urn=` the
/// body must not carry `urns`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContactWrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// ISO 639-3 code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub urns: Option<Vec<String>>,
    /// Group UUIDs or names (manual groups only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, Option<String>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A contact group.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Group {
    #[serde(deserialize_with = "lenient")]
    pub uuid: String,
    #[serde(deserialize_with = "lenient")]
    pub name: String,
    /// The query of a smart group; `None` for manual groups.
    #[serde(deserialize_with = "lenient")]
    pub query: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub status: Option<GroupStatus>,
    #[serde(deserialize_with = "lenient")]
    pub system: bool,
    #[serde(deserialize_with = "lenient")]
    pub count: Option<u64>,
}

/// Body of a group create or rename: `{"name": …}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupWrite {
    pub name: String,
}

/// A contact field definition.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Field {
    #[serde(deserialize_with = "lenient")]
    pub key: String,
    #[serde(deserialize_with = "lenient")]
    pub name: Option<String>,
    #[serde(rename = "type", deserialize_with = "lenient")]
    pub field_type: Option<FieldType>,
    /// Deprecated alias of `name`.
    #[serde(deserialize_with = "lenient")]
    pub label: Option<String>,
    /// Deprecated alias of `type` (`numeric` for `number`).
    #[serde(deserialize_with = "lenient")]
    pub value_type: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub featured: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub priority: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub agent_access: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub usages: Option<Value>,
}

impl Field {
    /// `name`, or the deprecated `label`.
    pub fn display_name(&self) -> Option<&str> {
        self.name.as_deref().or(self.label.as_deref())
    }
}

/// Body of a field create (`POST /fields.json`) or update (`?key=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldWrite {
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
}

/// Body of `POST /contact_actions.json`. `group` is required for `add` and
/// `remove` and forbidden otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactActionRequest {
    /// 1 to 100 contact UUIDs or URNs.
    pub contacts: Vec<String>,
    pub action: ContactAction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `GET /workspace.json`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Workspace {
    #[serde(deserialize_with = "lenient")]
    pub uuid: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub name: String,
    #[serde(deserialize_with = "lenient")]
    pub country: Option<String>,
    /// The first language is where a plain-string broadcast `text` goes.
    #[serde(deserialize_with = "lenient")]
    pub languages: Vec<String>,
    #[serde(deserialize_with = "lenient")]
    pub timezone: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub date_style: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub anon: bool,
    /// Deprecated by RapidPro.
    #[serde(deserialize_with = "lenient")]
    pub primary_language: Option<String>,
}

/// `flows.runs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct FlowRunCounts {
    #[serde(deserialize_with = "lenient")]
    pub active: u64,
    #[serde(deserialize_with = "lenient")]
    pub waiting: u64,
    #[serde(deserialize_with = "lenient")]
    pub completed: u64,
    #[serde(deserialize_with = "lenient")]
    pub interrupted: u64,
    #[serde(deserialize_with = "lenient")]
    pub expired: u64,
    #[serde(deserialize_with = "lenient")]
    pub failed: u64,
}

/// `flows.results[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct FlowResultSpec {
    #[serde(deserialize_with = "lenient")]
    pub key: String,
    #[serde(deserialize_with = "lenient")]
    pub name: String,
    #[serde(deserialize_with = "lenient")]
    pub categories: Vec<String>,
    #[serde(deserialize_with = "lenient")]
    pub node_uuids: Vec<String>,
}

/// A flow (`GET /flows.json`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Flow {
    #[serde(deserialize_with = "lenient")]
    pub uuid: String,
    #[serde(deserialize_with = "lenient")]
    pub name: String,
    #[serde(rename = "type", deserialize_with = "lenient")]
    pub flow_type: Option<FlowType>,
    #[serde(deserialize_with = "lenient")]
    pub archived: bool,
    #[serde(deserialize_with = "lenient")]
    pub labels: Vec<ObjectRef>,
    /// Minutes; 0 for surveys.
    #[serde(deserialize_with = "lenient")]
    pub expires: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub runs: FlowRunCounts,
    #[serde(deserialize_with = "lenient")]
    pub results: Vec<FlowResultSpec>,
    #[serde(deserialize_with = "lenient")]
    pub parent_refs: Vec<ObjectRef>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub created_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub modified_on: Option<DateTime<Utc>>,
}

/// `progress` of a broadcast or flow start (`total` is -1 until queued).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Progress {
    #[serde(deserialize_with = "lenient")]
    pub total: i64,
    #[serde(deserialize_with = "lenient")]
    pub started: i64,
}

/// A flow start as read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct FlowStart {
    #[serde(deserialize_with = "lenient")]
    pub uuid: String,
    #[serde(deserialize_with = "lenient")]
    pub id: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub flow: Option<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub status: Option<JobStatus>,
    #[serde(deserialize_with = "lenient")]
    pub progress: Option<Progress>,
    #[serde(deserialize_with = "lenient")]
    pub groups: Vec<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub contacts: Vec<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub params: Option<serde_json::Map<String, Value>>,
    /// Deprecated alias of `params`.
    #[serde(deserialize_with = "lenient")]
    pub extra: Option<serde_json::Map<String, Value>>,
    #[serde(deserialize_with = "lenient")]
    pub restart_participants: Option<bool>,
    #[serde(deserialize_with = "lenient")]
    pub exclude_active: Option<bool>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub created_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub modified_on: Option<DateTime<Utc>>,
}

/// Body of `POST /flow_starts.json`. At least one of `groups`, `contacts`
/// or `urns` is needed; unknown `urns` create contacts. Empty lists and
/// unset options are not sent (RapidPro's defaults apply:
/// `restart_participants` true, `exclude_active` false).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowStartWrite {
    pub flow: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contacts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_participants: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_active: Option<bool>,
    /// Available in the flow as `@trigger.params` (≤ 10,000 JSON chars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Map<String, Value>>,
}

/// A value either untranslated (RapidPro stores it under the workspace's
/// first language) or keyed by ISO 639-3 language code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Translated<T> {
    Plain(T),
    ByLanguage(BTreeMap<String, T>),
}

impl<T> Translated<T> {
    /// The value in `language`, or the plain value.
    pub fn get(&self, language: &str) -> Option<&T> {
        match self {
            Translated::Plain(value) => Some(value),
            Translated::ByLanguage(map) => map.get(language),
        }
    }
}

/// A quick reply of a broadcast or message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct QuickReply {
    /// `text` (RapidPro's default), `form`, `url` or `location`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<String>,
}

/// A broadcast as read. `text`, `attachments` and `quick_replies` are
/// keyed by language in current RapidPro (plain in older versions).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Broadcast {
    #[serde(deserialize_with = "lenient")]
    pub uuid: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub id: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub status: Option<JobStatus>,
    #[serde(deserialize_with = "lenient")]
    pub progress: Option<Progress>,
    /// `None` in anonymous workspaces.
    #[serde(deserialize_with = "lenient")]
    pub urns: Option<Vec<String>>,
    #[serde(deserialize_with = "lenient")]
    pub contacts: Vec<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub groups: Vec<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub text: Option<Translated<String>>,
    #[serde(deserialize_with = "lenient")]
    pub attachments: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    pub quick_replies: Option<Value>,
    #[serde(deserialize_with = "lenient")]
    pub base_language: Option<String>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub created_on: Option<DateTime<Utc>>,
}

/// Body of `POST /broadcasts.json`. Needs text or attachments, and at
/// least one of `urns`, `contacts` or `groups`; unknown `urns` create
/// contacts. Text ≤ 4096 chars and may use expressions (`@contact.name`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BroadcastWrite {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urns: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contacts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Translated<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Translated<Vec<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quick_replies: Option<Translated<Vec<QuickReply>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_language: Option<String>,
}

/// `messages.attachments[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Attachment {
    #[serde(deserialize_with = "lenient")]
    pub content_type: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub url: Option<String>,
}

/// A message as read (`GET /messages.json`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Message {
    #[serde(deserialize_with = "lenient")]
    pub uuid: Option<String>,
    /// Deprecated by RapidPro.
    #[serde(deserialize_with = "lenient")]
    pub id: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub contact: Option<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub urn: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub channel: Option<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub direction: Option<MessageDirection>,
    /// `text`, `optin` or `voice`.
    #[serde(rename = "type", deserialize_with = "lenient")]
    pub message_type: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub status: Option<MessageStatus>,
    #[serde(deserialize_with = "lenient")]
    pub archived: Option<bool>,
    /// `visible` or `archived`.
    #[serde(deserialize_with = "lenient")]
    pub visibility: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub text: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub labels: Vec<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub flow: Option<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub attachments: Vec<Attachment>,
    #[serde(deserialize_with = "lenient")]
    pub quick_replies: Vec<QuickReply>,
    /// Broadcast id (deprecated by RapidPro).
    #[serde(deserialize_with = "lenient")]
    pub broadcast: Option<i64>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub created_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub sent_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub modified_on: Option<DateTime<Utc>>,
}

/// `runs.contact`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct RunContact {
    #[serde(deserialize_with = "lenient")]
    pub uuid: String,
    #[serde(deserialize_with = "lenient")]
    pub name: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub urn: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub urn_display: Option<String>,
}

/// `runs.start`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct RunStart {
    #[serde(deserialize_with = "lenient")]
    pub uuid: String,
}

/// `runs.path[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct RunStep {
    #[serde(deserialize_with = "lenient")]
    pub node: String,
    #[serde(deserialize_with = "lenient_datetime")]
    pub time: Option<DateTime<Utc>>,
}

/// `runs.values.<key>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct RunValue {
    #[serde(deserialize_with = "lenient")]
    pub name: Option<String>,
    #[serde(deserialize_with = "lenient_text")]
    pub value: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub category: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub node: Option<String>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub time: Option<DateTime<Utc>>,
    /// Only in older RapidPro versions.
    #[serde(deserialize_with = "lenient_text")]
    pub input: Option<String>,
}

/// A flow run (`GET /runs.json`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Run {
    #[serde(deserialize_with = "lenient")]
    pub uuid: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub id: Option<i64>,
    #[serde(deserialize_with = "lenient")]
    pub flow: Option<ObjectRef>,
    #[serde(deserialize_with = "lenient")]
    pub contact: Option<RunContact>,
    #[serde(deserialize_with = "lenient")]
    pub start: Option<RunStart>,
    #[serde(deserialize_with = "lenient")]
    pub responded: bool,
    /// `None` when listed with `paths=false`.
    #[serde(deserialize_with = "lenient")]
    pub path: Option<Vec<RunStep>>,
    /// Keyed by result key (snake_case).
    #[serde(deserialize_with = "lenient")]
    pub values: BTreeMap<String, RunValue>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub created_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub modified_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient_datetime")]
    pub exited_on: Option<DateTime<Utc>>,
    #[serde(deserialize_with = "lenient")]
    pub exit_type: Option<ExitType>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike};
    use serde_json::json;

    #[test]
    fn both_datetime_forms_parse_to_the_same_instant() {
        let z = parse_datetime("2015-11-11T13:05:57.457742Z").unwrap();
        let offset = parse_datetime("2015-11-11T13:05:57.457742+00:00").unwrap();
        assert_eq!(z, offset);
        assert_eq!(z.nanosecond(), 457_742_000);
        let whole = parse_datetime("2013-03-02T17:28:12Z").unwrap();
        assert_eq!(whole, Utc.with_ymd_and_hms(2013, 3, 2, 17, 28, 12).unwrap());
        let millis = parse_datetime("2013-08-19T19:11:21.082Z").unwrap();
        assert_eq!(millis.nanosecond(), 82_000_000);
        let local = parse_datetime("2017-11-11T13:12:13+02:00").unwrap();
        assert_eq!(local.hour(), 11);
        assert_eq!(parse_datetime("yesterday"), None);
        assert_eq!(
            format_datetime(&z),
            "2015-11-11T13:05:57.457742Z",
            "format is the recommended before/after form"
        );
    }

    #[test]
    fn contacts_in_both_fixture_styles_parse() {
        let docs: Page<Contact> = serde_json::from_value(json!({
            "next": null, "previous": null,
            "results": [{
                "uuid": "09d23a05-47fe-11e4-bfe9-b8f6b119e9ab",
                "name": "Ben Haggerty", "status": "active", "language": null,
                "urns": ["tel:+250788123123"],
                "groups": [{"name": "Customers", "uuid": "5a4eb79e-1b1f-4ae3-8700-09384cca385f"}],
                "fields": {"nickname": "Macklemore", "side_kick": "Ryan Lewis"},
                "flow": {"uuid": "c1bc5fcf-3e27-4265-97bf-f6c3a385c2d6", "name": "Registration"},
                "created_on": "2015-11-11T13:05:57.457742Z",
                "modified_on": "2020-08-11T13:05:57.576056Z",
                "last_seen_on": "2020-07-11T13:05:57.576056Z"
            }]
        }))
        .unwrap();
        let c = &docs.results[0];
        assert_eq!(c.status, Some(ContactStatus::Active));
        assert_eq!(c.groups[0].name.as_deref(), Some("Customers"));
        assert_eq!(c.fields["nickname"].as_deref(), Some("Macklemore"));
        assert_eq!(c.modified_on.unwrap().year(), 2020);

        let python: Page<Contact> = serde_json::from_value(json!({
            "results": [{
                "uuid": "5079cb96-a1d8-4f47-8c87-d8c7bb6ddab9", "name": "Joe",
                "fields": {"nickname": "Jo", "age": 34, "gone": null},
                "status": "stopped-ish",
                "created_on": "2015-11-11T08:30:24.922024+00:00",
                "modified_on": "not a date",
                "urns": "tel:+1"
            }]
        }))
        .unwrap();
        let c = &python.results[0];
        assert_eq!(python.next, None);
        assert_eq!(c.fields["age"].as_deref(), Some("34"));
        assert_eq!(c.fields["gone"], None);
        assert_eq!(c.status, Some(ContactStatus::Other("stopped-ish".into())));
        assert_eq!(
            c.created_on,
            parse_datetime("2015-11-11T08:30:24.922024Z"),
            "+00:00 form"
        );
        assert_eq!(c.modified_on, None, "an odd date does not fail the page");
        assert!(c.urns.is_empty(), "an odd shape takes the default");
    }

    #[test]
    fn deleted_contacts_have_nulls() {
        let c: Contact = serde_json::from_value(json!({
            "uuid": "u", "name": null, "status": null, "language": null, "urns": [],
            "groups": [], "notes": [], "fields": {}, "flow": null,
            "created_on": "2015-11-11T13:05:57Z", "modified_on": "2015-11-11T13:05:57Z",
            "last_seen_on": null, "blocked": null, "stopped": null
        }))
        .unwrap();
        assert_eq!(c.status, None);
        assert_eq!(c.blocked, None);
    }

    #[test]
    fn contact_write_sends_only_the_keys_set() {
        let mut fields = BTreeMap::new();
        fields.insert("nickname".to_string(), Some("Ben".to_string()));
        fields.insert("old".to_string(), None);
        let body = ContactWrite {
            fields: Some(fields),
            ..ContactWrite::default()
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"fields": {"nickname": "Ben", "old": null}})
        );
        assert_eq!(
            serde_json::to_value(ContactWrite::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn statuses_keep_unknown_values() {
        let start: FlowStart = serde_json::from_value(json!({
            "uuid": "09d23a05-47fe-11e4-bfe9-b8f6b119e9ab", "status": "complete",
            "params": {"first_name": "Ryan"}, "created_on": "2013-08-19T19:11:21.082Z"
        }))
        .unwrap();
        assert_eq!(start.status, Some(JobStatus::Other("complete".into())));
        assert_eq!(start.status.as_ref().unwrap().as_str(), "complete");
        assert_eq!(
            serde_json::to_value(JobStatus::Completed).unwrap(),
            json!("completed")
        );
        assert_eq!(MessageStatus::parse("wired"), MessageStatus::Wired);
    }

    #[test]
    fn broadcast_text_is_plain_or_translated() {
        let old: Broadcast = serde_json::from_value(json!({
            "id": 1234, "urns": ["tel:+250788123123"], "text": "hello world",
            "created_on": "2013-03-02T17:28:12.123456Z"
        }))
        .unwrap();
        assert_eq!(old.text, Some(Translated::Plain("hello world".into())));
        let new: Broadcast = serde_json::from_value(json!({
            "uuid": "0199bb98-3637-778d-9dfc-0ab85c950d7c", "status": "pending",
            "progress": {"total": -1, "started": 0}, "urns": null,
            "text": {"eng": "Hello"}, "attachments": {"eng": []}, "base_language": "eng"
        }))
        .unwrap();
        assert_eq!(
            new.text
                .as_ref()
                .and_then(|t| t.get("eng"))
                .map(String::as_str),
            Some("Hello")
        );
        assert_eq!(new.progress.unwrap().total, -1);
        assert_eq!(new.urns, None);
        let write = BroadcastWrite {
            urns: vec!["tel:+250788123123".into()],
            text: Some(Translated::Plain("hello @contact.name".into())),
            ..BroadcastWrite::default()
        };
        assert_eq!(
            serde_json::to_value(&write).unwrap(),
            json!({"urns": ["tel:+250788123123"], "text": "hello @contact.name"})
        );
    }

    #[test]
    fn messages_and_runs_parse() {
        let m: Message = serde_json::from_value(json!({
            "id": 4105426, "broadcast": 2690007, "direction": "out", "type": "inbox",
            "status": "wired", "text": "How are you?",
            "attachments": [{"content_type": "audio/wav", "url": "http://domain.com/recording.wav"}],
            "created_on": "2016-01-06T15:33:00.813162Z", "sent_on": null
        }))
        .unwrap();
        assert_eq!(m.direction, Some(MessageDirection::Out));
        assert_eq!(m.broadcast, Some(2690007));
        assert_eq!(m.sent_on, None);
        assert_eq!(m.attachments[0].content_type.as_deref(), Some("audio/wav"));

        let r: Run = serde_json::from_value(json!({
            "id": 12345678, "responded": true, "path": null,
            "contact": {"uuid": "d33e9ad5-5c35-414c-abd4-e7451c69ff1d", "urn": "tel:+12065551212"},
            "values": {"color": {"value": "blue", "category": "Blue", "name": "color",
                                  "time": "2015-11-11T13:03:51.635662Z", "input": "it is blue"}},
            "exit_type": null, "exited_on": null
        }))
        .unwrap();
        assert_eq!(r.values["color"].category.as_deref(), Some("Blue"));
        assert_eq!(r.exit_type, None);
        assert_eq!(r.path, None);
    }

    #[test]
    fn contact_action_body() {
        let body = ContactActionRequest {
            contacts: vec!["tel:+250783835665".into()],
            action: ContactAction::Add,
            group: Some("Testers".into()),
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"contacts": ["tel:+250783835665"], "action": "add", "group": "Testers"})
        );
    }
}
