//! `ElasticsearchIndex`: the contact index in Elasticsearch (8.x and 9.x),
//! for national scale, with the official `elasticsearch` crate.
//!
//! Searches go to the alias `<index_prefix>-contacts`, which points at one
//! concrete index `<index_prefix>-contacts-<UTC time>` created with an
//! explicit mapping. `clear` (a rebuild) creates a new concrete index and
//! writes there; its `commit` refreshes it and moves the alias in one
//! `_aliases` call, then deletes the old index, so searches see the old
//! index until the new one is complete and a failed rebuild changes
//! nothing. Writes use the bulk API without a refresh; `commit` refreshes
//! (searchable) and writes the checkpoint into the index mapping's `_meta`.
//! Each document's `_source` holds the derived fields it is searched and
//! counted by, and the whole `ContactDocument` under `document` (not
//! indexed).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use elasticsearch::auth::Credentials;
use elasticsearch::http::request::JsonBody;
use elasticsearch::http::response::Response;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesGetAliasParts, IndicesGetMappingParts,
    IndicesPutMappingParts, IndicesRefreshParts,
};
use elasticsearch::{BulkParts, CountParts, Elasticsearch, OpenPointInTimeParts, SearchParts};
use serde_json::{Value, json};

use super::{
    ContactDocument, ContactIndex, ContactPage, ContactQuery, IndexError, StatsBy, fuzzy_distance,
    phone_digits,
};
use crate::config::ElasticsearchSettings;

/// Documents per bulk request.
const BULK_BATCH: usize = 500;
/// Matches per page when reading every match (`references`).
const SCAN_PAGE: usize = 5_000;
/// Elasticsearch's default `index.max_result_window`: `from + size` beyond
/// it is refused.
const MAX_RESULT_WINDOW: usize = 10_000;
const TIMEOUT: Duration = Duration::from_secs(30);

fn backend(error: impl std::fmt::Display) -> IndexError {
    IndexError::Backend(format!("elasticsearch: {error}"))
}

/// The explicit mapping of a concrete index: keywords for filters and
/// statistics, names through a lowercasing, accent-folding analyzer.
pub fn index_body() -> Value {
    let keyword = json!({ "type": "keyword" });
    json!({
        "settings": {
            "analysis": {
                "analyzer": {
                    "folded": {
                        "type": "custom",
                        "tokenizer": "standard",
                        "filter": ["lowercase", "asciifolding"]
                    }
                }
            }
        },
        "mappings": {
            "dynamic": "strict",
            "properties": {
                "reference": keyword,
                "type": keyword,
                "names": { "type": "text", "analyzer": "folded" },
                "phone": keyword,
                "cadre": keyword,
                "job": keyword,
                "location": keyword,
                "group": keyword,
                "opted_out": { "type": "boolean" },
                "has_phone": { "type": "boolean" },
                "region": keyword,
                "district": keyword,
                "gender": keyword,
                "status": keyword,
                "last_reply": { "type": "date" },
                "document": { "type": "object", "enabled": false }
            }
        }
    })
}

/// A document's `_source`.
pub fn source(document: &ContactDocument) -> Result<Value, IndexError> {
    Ok(json!({
        "reference": document.reference,
        "type": document.resource_type,
        "names": document.names,
        "phone": document.phone_endings(),
        "cadre": document.counted_cadres(),
        "job": document.jobs.iter().map(|j| j.code.as_str()).collect::<Vec<_>>(),
        "location": document.places.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        "group": document.groups,
        "opted_out": document.opted_out,
        "has_phone": !document.phones.is_empty(),
        "region": document.counted(StatsBy::Region),
        "district": document.counted(StatsBy::District),
        "gender": document.counted(StatsBy::Gender),
        "status": document.counted(StatsBy::Status),
        "last_reply": document.last_reply,
        "document": serde_json::to_value(document).map_err(backend)?,
    }))
}

/// The Elasticsearch query of `query`'s filters (a `bool` of `must` for
/// the names, scored, and `filter` for the rest).
pub fn to_query(query: &ContactQuery) -> Value {
    let mut must: Vec<Value> = Vec::new();
    let mut filter: Vec<Value> = Vec::new();
    let term = |field: &str, value: Value| json!({ "term": { field: value } });
    if let Some(q) = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        match phone_digits(q) {
            Some(digits) => filter.push(term("phone", json!(digits))),
            None => {
                for word in q
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                {
                    must.push(json!({
                        "match": { "names": { "query": word, "fuzziness": fuzzy_distance(word) } }
                    }));
                }
            }
        }
    }
    if let Some(t) = &query.resource_type {
        filter.push(term("type", json!(t)));
    }
    if let Some(cadre) = &query.cadre {
        filter.push(json!({ "bool": { "should": [
            { "term": { "cadre": cadre } },
            { "term": { "job": cadre } }
        ], "minimum_should_match": 1 } }));
    }
    for (field, value) in [
        ("job", &query.job),
        ("location", &query.location),
        ("group", &query.group),
    ] {
        if let Some(value) = value {
            filter.push(term(field, json!(value)));
        }
    }
    if let Some(opted_out) = query.opted_out {
        filter.push(term("opted_out", json!(opted_out)));
    }
    if let Some(has_phone) = query.has_phone {
        filter.push(term("has_phone", json!(has_phone)));
    }
    if let Some(since) = query.replied_since {
        filter.push(json!({ "range": { "last_reply": { "gte": since.to_rfc3339() } } }));
    }
    if must.is_empty() && filter.is_empty() {
        return json!({ "match_all": {} });
    }
    json!({ "bool": { "must": must, "filter": filter } })
}

fn stats_field(by: StatsBy) -> &'static str {
    match by {
        StatsBy::Cadre => "cadre",
        StatsBy::Region => "region",
        StatsBy::District => "district",
        StatsBy::Gender => "gender",
        StatsBy::Status => "status",
    }
}

/// The body of a failed answer, shortened, with its status.
async fn failure(response: Response) -> IndexError {
    let status = response.status_code().as_u16();
    let body = response.text().await.unwrap_or_default();
    let reason = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| {
            let error = &v["error"];
            error["reason"]
                .as_str()
                .or(error.as_str())
                .map(|r| match error["type"].as_str() {
                    Some(kind) => format!("{kind}: {r}"),
                    None => r.to_string(),
                })
        })
        .unwrap_or_else(|| body.chars().take(200).collect());
    backend(format!("HTTP {status}: {reason}"))
}

/// The JSON of a successful answer; any other status is an error.
async fn json_of(sent: Result<Response, elasticsearch::Error>) -> Result<Value, IndexError> {
    let response = sent.map_err(backend)?;
    if !response.status_code().is_success() {
        return Err(failure(response).await);
    }
    response.json::<Value>().await.map_err(backend)
}

struct State {
    /// The concrete index a rebuild writes into, until its commit.
    staging: Option<String>,
    checkpoint: Option<DateTime<Utc>>,
}

/// The contact index in Elasticsearch.
pub struct ElasticsearchIndex {
    client: Elasticsearch,
    alias: String,
    state: Mutex<State>,
}

impl ElasticsearchIndex {
    /// Connects, creates the alias and its first concrete index if there
    /// is none, and reads the checkpoint.
    pub async fn open(settings: &ElasticsearchSettings) -> Result<ElasticsearchIndex, IndexError> {
        let index = Self::connect(settings)?;
        let checkpoint = match index.current_indices().await? {
            current if current.is_empty() => {
                let name = index.new_index_name();
                let mut body = index_body();
                body["aliases"] = json!({ &index.alias: {} });
                index.create_index(&name, body).await?;
                None
            }
            _ => index.read_checkpoint().await?,
        };
        index.lock().checkpoint = checkpoint;
        Ok(index)
    }

    /// What `mhero check` says of the index, creating nothing.
    pub async fn describe(settings: &ElasticsearchSettings) -> Result<String, IndexError> {
        let index = Self::connect(settings)?;
        let current = index.current_indices().await?;
        if current.is_empty() {
            return Ok(format!(
                "{}: not created yet (`mhero serve` creates it)",
                index.alias
            ));
        }
        let people = index.count().await?;
        let checkpoint = index.read_checkpoint().await?;
        Ok(format!(
            "{} -> {}: {people} people, current to {}",
            index.alias,
            current.join(", "),
            checkpoint.map_or("no checkpoint".to_string(), |t| t.to_rfc3339())
        ))
    }

    fn connect(settings: &ElasticsearchSettings) -> Result<ElasticsearchIndex, IndexError> {
        let url = settings.url.clone().ok_or_else(|| {
            IndexError::Config(
                "index.elasticsearch.url is not set (index.backend = \"elasticsearch\")".into(),
            )
        })?;
        let prefix = settings.index_prefix.trim();
        if prefix.is_empty()
            || !prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c))
        {
            return Err(IndexError::Config(format!(
                "index.elasticsearch.index_prefix {prefix:?} must be lowercase letters, digits, - or _"
            )));
        }
        let mut transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
            .timeout(TIMEOUT)
            .disable_proxy();
        if let Some(username) = &settings.username {
            let password = settings
                .password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            transport = transport.auth(Credentials::Basic(username.clone(), password));
        }
        let client = Elasticsearch::new(transport.build().map_err(backend)?);
        Ok(ElasticsearchIndex {
            client,
            alias: format!("{prefix}-contacts"),
            state: Mutex::new(State {
                staging: None,
                checkpoint: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_index_name(&self) -> String {
        format!("{}-{}", self.alias, Utc::now().format("%Y%m%d%H%M%S%3f"))
    }

    /// Where writes go: the rebuild's new index, or the alias.
    fn target(&self) -> String {
        self.lock()
            .staging
            .clone()
            .unwrap_or_else(|| self.alias.clone())
    }

    async fn create_index(&self, name: &str, body: Value) -> Result<(), IndexError> {
        json_of(
            self.client
                .indices()
                .create(IndicesCreateParts::Index(name))
                .body(body)
                .send()
                .await,
        )
        .await
        .map(|_| ())
    }

    /// The concrete indices behind the alias (none: 404).
    async fn current_indices(&self) -> Result<Vec<String>, IndexError> {
        let response = self
            .client
            .indices()
            .get_alias(IndicesGetAliasParts::Name(&[&self.alias]))
            .send()
            .await
            .map_err(backend)?;
        if response.status_code().as_u16() == 404 {
            return Ok(Vec::new());
        }
        let body = json_of(Ok(response)).await?;
        Ok(body
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default())
    }

    async fn read_checkpoint(&self) -> Result<Option<DateTime<Utc>>, IndexError> {
        let body = json_of(
            self.client
                .indices()
                .get_mapping(IndicesGetMappingParts::Index(&[&self.alias]))
                .send()
                .await,
        )
        .await?;
        Ok(body
            .as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .filter_map(|index| index["mappings"]["_meta"]["checkpoint"].as_str())
            .filter_map(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .max())
    }

    async fn bulk(&self, lines: Vec<JsonBody<Value>>) -> Result<(), IndexError> {
        if lines.is_empty() {
            return Ok(());
        }
        let body = json_of(self.client.bulk(BulkParts::None).body(lines).send().await).await?;
        if body["errors"] == Value::Bool(true) {
            // (A delete of a document the index does not have is
            // `not_found` without an error: not a failure.)
            let failed = body["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| item.as_object()?.values().next())
                .find(|result| !result["error"].is_null());
            if let Some(result) = failed {
                return Err(backend(format!(
                    "bulk write of {} refused: {}: {}",
                    result["_id"].as_str().unwrap_or("?"),
                    result["error"]["type"].as_str().unwrap_or("error"),
                    result["error"]["reason"]
                        .as_str()
                        .unwrap_or("no reason given")
                )));
            }
        }
        Ok(())
    }

    async fn search_body(&self, body: Value) -> Result<Value, IndexError> {
        json_of(
            self.client
                .search(SearchParts::Index(&[&self.alias]))
                .body(body)
                .send()
                .await,
        )
        .await
    }
}

fn documents_of(hits: &Value) -> Result<Vec<ContactDocument>, IndexError> {
    hits["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|hit| serde_json::from_value(hit["_source"]["document"].clone()).map_err(backend))
        .collect()
}

#[async_trait::async_trait]
impl ContactIndex for ElasticsearchIndex {
    async fn upsert(&self, documents: Vec<ContactDocument>) -> Result<(), IndexError> {
        let target = self.target();
        for chunk in documents.chunks(BULK_BATCH) {
            let mut lines = Vec::with_capacity(chunk.len() * 2);
            for document in chunk {
                lines.push(JsonBody::new(
                    json!({ "index": { "_index": target, "_id": document.reference } }),
                ));
                lines.push(JsonBody::new(source(document)?));
            }
            self.bulk(lines).await?;
        }
        Ok(())
    }

    async fn delete(&self, references: Vec<String>) -> Result<(), IndexError> {
        let target = self.target();
        for chunk in references.chunks(BULK_BATCH) {
            let lines = chunk
                .iter()
                .map(|r| JsonBody::new(json!({ "delete": { "_index": target, "_id": r } })))
                .collect();
            self.bulk(lines).await?;
        }
        Ok(())
    }

    async fn clear(&self) -> Result<(), IndexError> {
        let name = self.new_index_name();
        self.create_index(&name, index_body()).await?;
        let abandoned = self.lock().staging.replace(name);
        if let Some(abandoned) = abandoned {
            let _ = self
                .client
                .indices()
                .delete(IndicesDeleteParts::Index(&[&abandoned]))
                .send()
                .await;
        }
        Ok(())
    }

    async fn commit(&self, checkpoint: Option<DateTime<Utc>>) -> Result<(), IndexError> {
        let (staging, checkpoint) = {
            let state = self.lock();
            (state.staging.clone(), checkpoint.or(state.checkpoint))
        };
        let target = staging.clone().unwrap_or_else(|| self.alias.clone());
        json_of(
            self.client
                .indices()
                .refresh(IndicesRefreshParts::Index(&[&target]))
                .send()
                .await,
        )
        .await?;
        if let Some(at) = checkpoint {
            json_of(
                self.client
                    .indices()
                    .put_mapping(IndicesPutMappingParts::Index(&[&target]))
                    .body(json!({ "_meta": { "checkpoint": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true) } }))
                    .send()
                    .await,
            )
            .await?;
        }
        if let Some(staging) = staging {
            let old = self.current_indices().await?;
            let mut actions: Vec<Value> = old
                .iter()
                .map(|index| json!({ "remove": { "index": index, "alias": self.alias } }))
                .collect();
            actions.push(json!({ "add": { "index": staging, "alias": self.alias } }));
            json_of(
                self.client
                    .indices()
                    .update_aliases()
                    .body(json!({ "actions": actions }))
                    .send()
                    .await,
            )
            .await?;
            self.lock().staging = None;
            let old: Vec<&str> = old.iter().map(String::as_str).collect();
            if !old.is_empty() {
                // The alias has moved: an old index left behind is only
                // disk, so a failure here is logged, not returned.
                if let Err(e) = json_of(
                    self.client
                        .indices()
                        .delete(IndicesDeleteParts::Index(&old))
                        .send()
                        .await,
                )
                .await
                {
                    tracing::warn!(error = %e, "the previous contact index could not be deleted");
                }
            }
        }
        self.lock().checkpoint = checkpoint;
        Ok(())
    }

    async fn checkpoint(&self) -> Result<Option<DateTime<Utc>>, IndexError> {
        Ok(self.lock().checkpoint)
    }

    async fn search(&self, query: &ContactQuery) -> Result<ContactPage, IndexError> {
        let size = query.page_size.clamp(1, super::MAX_PAGE_SIZE);
        if (query.page + 1) * size > MAX_RESULT_WINDOW {
            return Err(IndexError::BadQuery {
                parameter: "page".into(),
                reason: format!(
                    "Elasticsearch pages only through the first {MAX_RESULT_WINDOW} matches; narrow the filters (an audience takes every match)"
                ),
            });
        }
        let body = self
            .search_body(json!({
                "query": to_query(query),
                "from": query.page * size,
                "size": size,
                "track_total_hits": true,
                "_source": ["document"],
                "sort": ["_score", { "reference": "asc" }]
            }))
            .await?;
        let total = body["hits"]["total"]["value"]
            .as_u64()
            .ok_or_else(|| backend("a search answer without hits.total.value"))?;
        Ok(ContactPage {
            total: total as usize,
            contacts: documents_of(&body)?,
        })
    }

    async fn references(&self, query: &ContactQuery) -> Result<Vec<String>, IndexError> {
        // One point in time: a consistent snapshot across pages.
        let pit = json_of(
            self.client
                .open_point_in_time(OpenPointInTimeParts::Index(&[&self.alias]))
                .keep_alive("1m")
                .send()
                .await,
        )
        .await?;
        let pit_id = pit["id"]
            .as_str()
            .ok_or_else(|| backend("a point in time without an id"))?
            .to_string();
        let mut references = Vec::new();
        let mut after: Option<Value> = None;
        let result = loop {
            let mut body = json!({
                "query": to_query(query),
                "size": SCAN_PAGE,
                "_source": false,
                "fields": ["reference"],
                "pit": { "id": pit_id, "keep_alive": "1m" },
                "sort": [{ "reference": "asc" }]
            });
            if let Some(after) = &after {
                body["search_after"] = after.clone();
            }
            let page = match json_of(
                self.client
                    .search(SearchParts::None)
                    .body(body)
                    .send()
                    .await,
            )
            .await
            {
                Ok(page) => page,
                Err(e) => break Err(e),
            };
            let hits = page["hits"]["hits"].as_array().cloned().unwrap_or_default();
            for hit in &hits {
                if let Some(reference) = hit["fields"]["reference"][0].as_str() {
                    references.push(reference.to_string());
                }
            }
            match hits.last() {
                Some(last) if hits.len() == SCAN_PAGE => after = Some(last["sort"].clone()),
                _ => break Ok(()),
            }
        };
        let _ = self
            .client
            .close_point_in_time()
            .body(json!({ "id": pit_id }))
            .send()
            .await;
        result?;
        references.sort_unstable();
        Ok(references)
    }

    async fn stats(
        &self,
        query: &ContactQuery,
        by: StatsBy,
    ) -> Result<BTreeMap<String, u64>, IndexError> {
        let body = self
            .search_body(json!({
                "query": to_query(query),
                "size": 0,
                "aggs": { "by": { "terms": { "field": stats_field(by), "size": 10000 } } }
            }))
            .await?;
        let mut counts = BTreeMap::new();
        for bucket in body["aggregations"]["by"]["buckets"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let (Some(key), Some(count)) = (bucket["key"].as_str(), bucket["doc_count"].as_u64())
            {
                counts.insert(key.to_string(), count);
            }
        }
        Ok(counts)
    }

    async fn count(&self) -> Result<u64, IndexError> {
        let body = json_of(
            self.client
                .count(CountParts::Index(&[&self.alias]))
                .send()
                .await,
        )
        .await?;
        body["count"]
            .as_u64()
            .ok_or_else(|| backend("a count answer without count"))
    }

    fn backend_name(&self) -> &'static str {
        "elasticsearch"
    }
}
