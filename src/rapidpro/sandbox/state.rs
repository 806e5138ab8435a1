//! The sandbox's in-memory state: the workspace's contacts, groups and
//! fields, the call log, the throttle history, the knobs, the webhooks
//! queued by runs and a strictly increasing clock that tests can advance. Also the API read shapes of contacts, groups and fields.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{Knobs, KnobsUpdate, Rate, SCOPES, SandboxSettings};

/// What one processing step did (`Sandbox::tick`, `POST /_sandbox/tick`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct TickReport {
    pub broadcasts: usize,
    pub flow_starts: usize,
    pub messages: usize,
    /// Runs that waited for a message past their flow's expiry.
    pub expired_runs: usize,
}

/// One API call as the sandbox received and answered it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallRecord {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The request body: JSON when it parses, else the text, else null.
    pub body: Value,
    pub status: u16,
    /// When the request arrived, RapidPro's datetime format.
    pub time: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Blocked,
    Stopped,
    Archived,
}

impl Status {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => Status::Active,
            "blocked" => Status::Blocked,
            "stopped" => Status::Stopped,
            "archived" => Status::Archived,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Blocked => "blocked",
            Status::Stopped => "stopped",
            Status::Archived => "archived",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Note {
    pub text: String,
    pub created_on: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Contact {
    pub id: u64,
    pub uuid: String,
    pub name: Option<String>,
    pub language: Option<String>,
    pub status: Status,
    /// Normalised URNs, highest priority first.
    pub urns: Vec<String>,
    /// Group ids.
    pub groups: Vec<u64>,
    /// Field key -> value (absent means null).
    pub fields: HashMap<String, String>,
    pub notes: Vec<Note>,
    pub created_on: DateTime<Utc>,
    pub modified_on: DateTime<Utc>,
    pub last_seen_on: Option<DateTime<Utc>>,
    pub deleted: bool,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub id: u64,
    pub uuid: String,
    pub name: String,
    pub query: Option<String>,
    pub system: bool,
    pub created_on: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub id: u64,
    pub key: String,
    pub name: String,
    /// `text|number|datetime|state|district|ward`.
    pub value_type: String,
    pub created_on: DateTime<Utc>,
}

pub struct Inner {
    pub settings: SandboxSettings,
    pub contacts: Vec<Contact>,
    pub groups: Vec<Group>,
    pub fields: Vec<Field>,
    /// Loaded from flow exports; kept by `reset`.
    pub flows: Vec<super::flows::Flow>,
    pub broadcasts: Vec<super::broadcasts::Broadcast>,
    pub messages: Vec<super::broadcasts::Message>,
    pub flow_starts: Vec<super::runs::FlowStart>,
    pub runs: Vec<super::runs::Run>,
    /// Created through the handle; kept by `reset`.
    pub resthooks: Vec<super::webhooks::Resthook>,
    pub subscribers: Vec<super::webhooks::Subscriber>,
    pub events: Vec<super::webhooks::Event>,
    pub webhook_calls: Vec<super::webhooks::WebhookCall>,
    /// Webhook and resthook POSTs runs are waiting for, sent outside the
    /// lock by `Sandbox::deliver_pending_webhooks`.
    pub pending_webhooks: Vec<super::engine::PendingWebhook>,
    pub calls: Vec<CallRecord>,
    pub throttle_log: HashMap<String, VecDeque<Instant>>,
    pub rates: BTreeMap<String, Rate>,
    pub latency: Duration,
    pub error_rate: f64,
    /// Fraction of API requests that hang (`timeout_rate` knob).
    pub timeout_rate: f64,
    /// Fraction of API requests whose connection is closed unanswered.
    pub drop_rate: f64,
    /// Every flow `call_webhook` goes here instead of its URL.
    pub webhook_url_override: Option<String>,
    pub auto_process: bool,
    /// Added to the wall clock (`Sandbox::advance_clock`).
    clock_offset: chrono::Duration,
    next_id: u64,
    last_time: DateTime<Utc>,
}

/// RapidPro's datetime format: UTC, microseconds, `Z`.
pub fn format_dt(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn opt_dt(t: &Option<DateTime<Utc>>) -> Value {
    t.as_ref()
        .map_or(Value::Null, |t| Value::String(format_dt(t)))
}

impl Inner {
    pub fn new(settings: SandboxSettings) -> Self {
        let mut rates: BTreeMap<String, Rate> = SCOPES
            .iter()
            .map(|s| (s.to_string(), Rate::per_hour(3600)))
            .collect();
        rates.extend(settings.throttle.clone());
        Inner {
            latency: settings.latency,
            error_rate: settings.error_rate.clamp(0.0, 1.0),
            timeout_rate: settings.timeout_rate.clamp(0.0, 1.0),
            drop_rate: settings.drop_rate.clamp(0.0, 1.0),
            webhook_url_override: settings.webhook_url_override.clone(),
            auto_process: settings.auto_process,
            clock_offset: chrono::Duration::zero(),
            settings,
            contacts: Vec::new(),
            groups: Vec::new(),
            fields: Vec::new(),
            flows: Vec::new(),
            broadcasts: Vec::new(),
            messages: Vec::new(),
            flow_starts: Vec::new(),
            runs: Vec::new(),
            resthooks: Vec::new(),
            subscribers: Vec::new(),
            events: Vec::new(),
            webhook_calls: Vec::new(),
            pending_webhooks: Vec::new(),
            calls: Vec::new(),
            throttle_log: HashMap::new(),
            rates,
            next_id: 1,
            last_time: DateTime::<Utc>::MIN_UTC,
        }
    }

    pub fn reset(&mut self) {
        self.contacts.clear();
        self.groups.clear();
        self.fields.clear();
        self.broadcasts.clear();
        self.messages.clear();
        self.flow_starts.clear();
        self.runs.clear();
        self.subscribers.clear();
        self.events.clear();
        self.webhook_calls.clear();
        self.pending_webhooks.clear();
        self.calls.clear();
        self.throttle_log.clear();
    }

    /// Now (plus the clock offset), truncated to microseconds, strictly
    /// after the last value handed out.
    pub fn now(&mut self) -> DateTime<Utc> {
        let now = Utc::now() + self.clock_offset;
        let micros = now.timestamp_micros();
        let mut t = DateTime::<Utc>::from_timestamp_micros(micros).unwrap_or(now);
        if t <= self.last_time {
            t = self.last_time + chrono::Duration::microseconds(1);
        }
        self.last_time = t;
        t
    }

    /// Moves the sandbox's clock forward (expiry tests).
    pub fn advance_clock(&mut self, by: chrono::Duration) {
        if by > chrono::Duration::zero() {
            self.clock_offset += by;
        }
    }

    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn knobs(&self) -> Knobs {
        Knobs {
            latency_ms: u64::try_from(self.latency.as_millis()).unwrap_or(u64::MAX),
            error_rate: self.error_rate,
            timeout_rate: self.timeout_rate,
            drop_rate: self.drop_rate,
            webhook_url_override: self.webhook_url_override.clone(),
            auto_process: self.auto_process,
            throttle: self
                .rates
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
        }
    }

    pub fn set_rate(&mut self, scope: &str, rate: Rate) {
        if scope == "*" {
            for s in SCOPES {
                self.rates.insert(s.to_string(), rate);
            }
        } else {
            self.rates.insert(scope.to_string(), rate);
        }
    }

    pub fn apply_knobs(&mut self, update: KnobsUpdate) -> Result<(), String> {
        let mut rates = Vec::new();
        for (scope, rate) in update.throttle.unwrap_or_default() {
            if scope != "*" && !SCOPES.contains(&scope.as_str()) {
                return Err(format!("unknown throttle scope {scope:?}"));
            }
            rates.push((scope, rate.parse::<Rate>()?));
        }
        for (name, rate) in [
            ("error_rate", update.error_rate),
            ("timeout_rate", update.timeout_rate),
            ("drop_rate", update.drop_rate),
        ] {
            if rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                return Err(format!("{name} must be between 0.0 and 1.0"));
            }
        }
        if let Some(url) = &update.webhook_url_override
            && !url.is_empty()
            && !url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            return Err("webhook_url_override must be an http(s) URL or \"\"".into());
        }
        if let Some(rate) = update.error_rate {
            self.error_rate = rate;
        }
        if let Some(rate) = update.timeout_rate {
            self.timeout_rate = rate;
        }
        if let Some(rate) = update.drop_rate {
            self.drop_rate = rate;
        }
        if let Some(url) = update.webhook_url_override {
            self.webhook_url_override = Some(url).filter(|u| !u.is_empty());
        }
        if let Some(auto) = update.auto_process {
            self.auto_process = auto;
        }
        if let Some(ms) = update.latency_ms {
            self.latency = Duration::from_millis(ms);
        }
        for (scope, rate) in rates {
            self.set_rate(&scope, rate);
        }
        Ok(())
    }

    pub fn tick(&mut self) -> TickReport {
        TickReport {
            broadcasts: super::broadcasts::process_pending(self),
            flow_starts: super::runs::process_pending(self),
            messages: super::broadcasts::send_queued(self),
            expired_runs: super::engine::expire_runs(self),
        }
    }

    pub fn group_by_id(&self, id: u64) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// A group by UUID or name (names are case-insensitive).
    pub fn find_group(&self, key: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.uuid == key).or_else(|| {
            let lower = key.to_lowercase();
            self.groups.iter().find(|g| g.name.to_lowercase() == lower)
        })
    }

    /// Members counted as RapidPro does: contacts currently in the group.
    pub fn group_count(&self, id: u64) -> usize {
        self.contacts
            .iter()
            .filter(|c| !c.deleted && c.groups.contains(&id))
            .count()
    }

    pub fn group_json(&self, g: &Group) -> Value {
        json!({
            "uuid": g.uuid,
            "name": g.name,
            "query": g.query,
            "status": "ready",
            "system": g.system,
            "count": self.group_count(g.id),
        })
    }

    pub fn field_json(f: &Field) -> Value {
        let value_type = if f.value_type == "number" {
            "numeric"
        } else {
            f.value_type.as_str()
        };
        json!({
            "key": f.key,
            "name": f.name,
            "type": f.value_type,
            "featured": false,
            "priority": 0,
            "usages": {"campaign_events": 0, "flows": 0, "groups": 0},
            "agent_access": "view",
            "label": f.name,
            "value_type": value_type,
        })
    }

    pub fn contact_json(&self, c: &Contact) -> Value {
        if c.deleted {
            return json!({
                "uuid": c.uuid, "name": null, "status": null, "language": null, "urns": [],
                "groups": [], "notes": [], "fields": {}, "flow": null,
                "created_on": format_dt(&c.created_on), "modified_on": format_dt(&c.modified_on),
                "last_seen_on": null, "blocked": null, "stopped": null,
            });
        }
        let groups: Vec<Value> = c
            .groups
            .iter()
            .filter_map(|id| self.group_by_id(*id))
            .map(|g| json!({"uuid": g.uuid, "name": g.name}))
            .collect();
        let mut fields = Map::new();
        for f in &self.fields {
            fields.insert(
                f.key.clone(),
                c.fields
                    .get(&f.key)
                    .map_or(Value::Null, |v| Value::String(v.clone())),
            );
        }
        let notes: Vec<Value> = c
            .notes
            .iter()
            .map(|n| {
                json!({
                    "text": n.text,
                    "created_on": format_dt(&n.created_on),
                    "created_by": {"email": self.settings.user_email, "name": "Sandbox API"},
                })
            })
            .collect();
        json!({
            "uuid": c.uuid,
            "name": c.name,
            "status": c.status.as_str(),
            "language": c.language,
            "urns": c.urns,
            "groups": groups,
            "notes": notes,
            "fields": fields,
            "flow": super::runs::current_flow(self, c.id),
            "created_on": format_dt(&c.created_on),
            "modified_on": format_dt(&c.modified_on),
            "last_seen_on": opt_dt(&c.last_seen_on),
            "blocked": c.status == Status::Blocked,
            "stopped": c.status == Status::Stopped,
        })
    }

    pub fn state_json(&self) -> Value {
        json!({
            "contacts": self.contacts.iter().map(|c| {
                let mut v = self.contact_json(c);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("deleted".into(), Value::Bool(c.deleted));
                }
                v
            }).collect::<Vec<_>>(),
            "groups": self.groups.iter().map(|g| self.group_json(g)).collect::<Vec<_>>(),
            "fields": self.fields.iter().map(Inner::field_json).collect::<Vec<_>>(),
            "flows": self.flows.iter().map(|f| super::flows::flow_json(self, f)).collect::<Vec<_>>(),
            "flow_starts": self.flow_starts.iter().map(|s| super::runs::start_json(self, s)).collect::<Vec<_>>(),
            "runs": self.runs.iter().map(|r| {
                let mut v = super::runs::run_json(self, r, true);
                v["waiting_for"] = super::engine::cursor_json(&r.cursor);
                v
            }).collect::<Vec<_>>(),
            "broadcasts": self.broadcasts.iter().map(|b| super::broadcasts::broadcast_json(self, b)).collect::<Vec<_>>(),
            "messages": self.messages.iter().map(|m| super::broadcasts::message_json(self, m)).collect::<Vec<_>>(),
        })
    }

    /// The live (non-deleted) contact holding this normalised URN.
    pub fn contact_by_urn(&self, urn: &str) -> Option<usize> {
        self.contacts
            .iter()
            .position(|c| !c.deleted && c.urns.iter().any(|u| u == urn))
    }

    /// Sets a live contact's status as the UI or an inbound STOP would;
    /// any non-active status empties its groups. False if no such contact.
    pub fn set_status(&mut self, uuid: &str, status: Status) -> bool {
        let Some(i) = self
            .contact_by_uuid(uuid)
            .filter(|i| !self.contacts[*i].deleted)
        else {
            return false;
        };
        let now = self.now();
        let c = &mut self.contacts[i];
        c.status = status;
        if status != Status::Active {
            c.groups.clear();
        }
        c.modified_on = now;
        true
    }

    pub fn contact_by_uuid(&self, uuid: &str) -> Option<usize> {
        self.contacts.iter().position(|c| c.uuid == uuid)
    }
}
