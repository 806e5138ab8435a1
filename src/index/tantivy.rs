//! `TantivyIndex`: the embedded contact index (the default), on disk under
//! `index.embedded.path`, with the `tantivy` crate.
//!
//! One tantivy document per person: the whole `ContactDocument` stored as
//! JSON, and the fields it is searched and counted by. Names go through a
//! tokenizer that splits on non-alphanumerics, lowercases and folds
//! accents (`Zoé` = `zoe`); phone numbers are indexed by every ending of 4
//! digits or more, so `q=1001`, `q=0770001001` (the trunk 0 dropped) and
//! `q=+231770001001` all find `+231770001001`. Keyword fields used for statistics are fast fields
//! (columnar), counted with tantivy's terms aggregation. All tantivy work
//! runs on blocking threads; one writer, behind a mutex.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tantivy::aggregation::agg_req::Aggregations;
use tantivy::aggregation::{AggContextParams, AggregationCollector, AggregationLimitsGuard};
use tantivy::collector::{Count, DocSetCollector, TopDocs};
use tantivy::directory::MmapDirectory;
use tantivy::query::{AllQuery, BooleanQuery, FuzzyTermQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value as _,
};
use tantivy::tokenizer::{AsciiFoldingFilter, LowerCaser, SimpleTokenizer, TextAnalyzer};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use chrono::{DateTime, Utc};

use super::{
    ContactDocument, ContactIndex, ContactPage, ContactQuery, IndexError, StatsBy, fuzzy_distance,
    phone_digits,
};

const NAME_TOKENIZER: &str = "mhero_folded";
const WRITER_MEMORY: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy)]
struct Fields {
    reference: Field,
    document: Field,
    resource_type: Field,
    name: Field,
    phone: Field,
    cadre: Field,
    job: Field,
    location: Field,
    group: Field,
    opted_out: Field,
    has_phone: Field,
    region: Field,
    district: Field,
    gender: Field,
    status: Field,
    /// Milliseconds since the epoch of the last reply (absent: none).
    last_reply: Field,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let names = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(NAME_TOKENIZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let counted = STRING | tantivy::schema::FAST;
    let fields = Fields {
        reference: builder.add_text_field("reference", STRING | STORED),
        document: builder.add_text_field("document", STORED),
        resource_type: builder.add_text_field("type", STRING),
        name: builder.add_text_field("name", names),
        phone: builder.add_text_field("phone", STRING),
        cadre: builder.add_text_field("cadre", counted.clone()),
        job: builder.add_text_field("job", STRING),
        location: builder.add_text_field("location", STRING),
        group: builder.add_text_field("group", STRING),
        opted_out: builder.add_text_field("opted_out", STRING),
        has_phone: builder.add_text_field("has_phone", STRING),
        region: builder.add_text_field("region", counted.clone()),
        district: builder.add_text_field("district", counted.clone()),
        gender: builder.add_text_field("gender", counted.clone()),
        status: builder.add_text_field("status", counted),
        last_reply: builder.add_i64_field("last_reply", INDEXED | FAST),
    };
    (builder.build(), fields)
}

fn backend(error: impl std::fmt::Display) -> IndexError {
    IndexError::Backend(error.to_string())
}

struct Inner {
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    fields: Fields,
    /// Written with every commit (tantivy's commit payload).
    checkpoint: Mutex<Option<DateTime<Utc>>>,
}

/// The embedded contact index.
#[derive(Clone)]
pub struct TantivyIndex {
    inner: Arc<Inner>,
}

impl TantivyIndex {
    /// Opens (or creates) the index in `path`, creating the directory.
    pub fn open(path: &Path) -> Result<TantivyIndex, IndexError> {
        std::fs::create_dir_all(path)
            .map_err(|e| backend(format!("cannot create {}: {e}", path.display())))?;
        let (schema, fields) = schema();
        let directory = MmapDirectory::open(path).map_err(backend)?;
        let index = Index::open_or_create(directory, schema).map_err(|e| {
            backend(format!(
                "{} is not a contact index of this version ({e}); delete it and run `mhero reindex`",
                path.display()
            ))
        })?;
        index.tokenizers().register(
            NAME_TOKENIZER,
            TextAnalyzer::builder(SimpleTokenizer::default())
                .filter(LowerCaser)
                .filter(AsciiFoldingFilter)
                .build(),
        );
        let writer = index.writer(WRITER_MEMORY).map_err(|e| match e {
            tantivy::TantivyError::LockFailure(..) => backend(format!(
                "the index in {} is in use by another mhero process (a running `mhero serve` keeps it current itself)",
                path.display()
            )),
            other => backend(other),
        })?;
        let checkpoint = index
            .load_metas()
            .map_err(backend)?
            .payload
            .and_then(|p| DateTime::parse_from_rfc3339(&p).ok())
            .map(|t| t.with_timezone(&Utc));
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(backend)?;
        Ok(TantivyIndex {
            inner: Arc::new(Inner {
                index,
                reader,
                writer: Mutex::new(writer),
                fields,
                checkpoint: Mutex::new(checkpoint),
            }),
        })
    }

    /// What `mhero check` says of the index in `path`, without taking
    /// the writer (a running `serve` holds it).
    pub fn describe(path: &Path) -> Result<String, IndexError> {
        if !path.join("meta.json").exists() {
            return Ok(format!(
                "{}: not built yet (`mhero serve` builds it on its first pass, or `mhero reindex`)",
                path.display()
            ));
        }
        let index = Index::open_in_dir(path).map_err(backend)?;
        let people = index.reader().map_err(backend)?.searcher().num_docs();
        let checkpoint = index.load_metas().map_err(backend)?.payload;
        Ok(format!(
            "{}: {people} people, current to {}",
            path.display(),
            checkpoint.as_deref().unwrap_or("no checkpoint")
        ))
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, IndexError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, IndexError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| backend(format!("index task failed: {e}")))?
    }
}

fn tantivy_document(
    fields: &Fields,
    document: &ContactDocument,
) -> Result<TantivyDocument, IndexError> {
    let mut doc = TantivyDocument::default();
    doc.add_text(fields.reference, &document.reference);
    doc.add_text(
        fields.document,
        serde_json::to_string(document).map_err(backend)?,
    );
    doc.add_text(fields.resource_type, &document.resource_type);
    for name in &document.names {
        doc.add_text(fields.name, name);
    }
    for ending in document.phone_endings() {
        doc.add_text(fields.phone, ending);
    }
    for cadre in document.counted_cadres() {
        doc.add_text(fields.cadre, cadre);
    }
    for job in &document.jobs {
        doc.add_text(fields.job, &job.code);
    }
    for place in &document.places {
        doc.add_text(fields.location, &place.id);
    }
    for group in &document.groups {
        doc.add_text(fields.group, group);
    }
    doc.add_text(fields.opted_out, document.opted_out.to_string());
    doc.add_text(fields.has_phone, (!document.phones.is_empty()).to_string());
    doc.add_text(fields.region, document.counted(StatsBy::Region));
    doc.add_text(fields.district, document.counted(StatsBy::District));
    doc.add_text(fields.gender, document.counted(StatsBy::Gender));
    doc.add_text(fields.status, document.counted(StatsBy::Status));
    if let Some(replied) = document.last_reply {
        doc.add_i64(fields.last_reply, replied.timestamp_millis());
    }
    Ok(doc)
}

fn term_query(field: Field, value: &str) -> Box<dyn Query> {
    Box::new(TermQuery::new(
        Term::from_field_text(field, value),
        IndexRecordOption::Basic,
    ))
}

/// The tantivy query of `query`'s filters.
fn to_query(inner: &Inner, query: &ContactQuery) -> Box<dyn Query> {
    let f = &inner.fields;
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    if let Some(q) = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        if let Some(digits) = phone_digits(q) {
            clauses.push((Occur::Must, term_query(f.phone, &digits)));
        } else {
            // Each word of `q`, folded like the names, within an edit
            // distance that grows with its length.
            let mut analyzer = inner
                .index
                .tokenizers()
                .get(NAME_TOKENIZER)
                .expect("registered at open");
            let mut stream = analyzer.token_stream(q);
            while stream.advance() {
                let word = stream.token().text.clone();
                let distance = fuzzy_distance(&word);
                let term = Term::from_field_text(f.name, &word);
                clauses.push((
                    Occur::Must,
                    Box::new(FuzzyTermQuery::new(term, distance, true)),
                ));
            }
        }
    }
    if let Some(t) = &query.resource_type {
        clauses.push((Occur::Must, term_query(f.resource_type, t)));
    }
    if let Some(cadre) = &query.cadre {
        let either = BooleanQuery::new(vec![
            (Occur::Should, term_query(f.cadre, cadre)),
            (Occur::Should, term_query(f.job, cadre)),
        ]);
        clauses.push((Occur::Must, Box::new(either)));
    }
    for (field, value) in [
        (f.job, &query.job),
        (f.location, &query.location),
        (f.group, &query.group),
    ] {
        if let Some(value) = value {
            clauses.push((Occur::Must, term_query(field, value)));
        }
    }
    if let Some(opted_out) = query.opted_out {
        clauses.push((Occur::Must, term_query(f.opted_out, &opted_out.to_string())));
    }
    if let Some(has_phone) = query.has_phone {
        clauses.push((Occur::Must, term_query(f.has_phone, &has_phone.to_string())));
    }
    if let Some(since) = query.replied_since {
        let from = Term::from_field_i64(f.last_reply, since.timestamp_millis());
        clauses.push((
            Occur::Must,
            Box::new(RangeQuery::new(
                std::ops::Bound::Included(from),
                std::ops::Bound::Unbounded,
            )),
        ));
    }
    if clauses.is_empty() {
        Box::new(AllQuery)
    } else {
        Box::new(BooleanQuery::new(clauses))
    }
}

#[async_trait::async_trait]
impl ContactIndex for TantivyIndex {
    async fn upsert(&self, documents: Vec<ContactDocument>) -> Result<(), IndexError> {
        self.blocking(move |inner| {
            let writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            for document in &documents {
                writer.delete_term(Term::from_field_text(
                    inner.fields.reference,
                    &document.reference,
                ));
                writer
                    .add_document(tantivy_document(&inner.fields, document)?)
                    .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn delete(&self, references: Vec<String>) -> Result<(), IndexError> {
        self.blocking(move |inner| {
            let writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            for reference in &references {
                writer.delete_term(Term::from_field_text(inner.fields.reference, reference));
            }
            Ok(())
        })
        .await
    }

    async fn clear(&self) -> Result<(), IndexError> {
        self.blocking(|inner| {
            let writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            writer.delete_all_documents().map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn commit(&self, checkpoint: Option<DateTime<Utc>>) -> Result<(), IndexError> {
        self.blocking(move |inner| {
            let mut writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            let mut kept = inner.checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            let checkpoint = checkpoint.or(*kept);
            let mut prepared = writer.prepare_commit().map_err(backend)?;
            if let Some(at) = checkpoint {
                prepared.set_payload(&at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            }
            prepared.commit().map_err(backend)?;
            *kept = checkpoint;
            inner.reader.reload().map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn checkpoint(&self) -> Result<Option<DateTime<Utc>>, IndexError> {
        Ok(*self
            .inner
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    fn backend_name(&self) -> &'static str {
        "embedded"
    }

    async fn search(&self, query: &ContactQuery) -> Result<ContactPage, IndexError> {
        let query = query.clone();
        self.blocking(move |inner| {
            let searcher = inner.reader.searcher();
            let size = query.page_size.clamp(1, 1000);
            let top = TopDocs::with_limit(size)
                .and_offset(query.page * size)
                .order_by_score();
            let (hits, total) = searcher
                .search(&to_query(inner, &query), &(top, Count))
                .map_err(backend)?;
            let mut contacts = Vec::with_capacity(hits.len());
            for (_, address) in hits {
                let doc: TantivyDocument = searcher.doc(address).map_err(backend)?;
                let json = doc
                    .get_first(inner.fields.document)
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| backend("a document without its body"))?;
                contacts.push(serde_json::from_str(json).map_err(backend)?);
            }
            Ok(ContactPage { total, contacts })
        })
        .await
    }

    async fn references(&self, query: &ContactQuery) -> Result<Vec<String>, IndexError> {
        let query = query.clone();
        self.blocking(move |inner| {
            let searcher = inner.reader.searcher();
            let matches = searcher
                .search(&to_query(inner, &query), &DocSetCollector)
                .map_err(backend)?;
            let mut references = Vec::with_capacity(matches.len());
            for address in matches {
                let doc: TantivyDocument = searcher.doc(address).map_err(backend)?;
                if let Some(reference) = doc
                    .get_first(inner.fields.reference)
                    .and_then(|v| v.as_str())
                {
                    references.push(reference.to_string());
                }
            }
            references.sort_unstable();
            Ok(references)
        })
        .await
    }

    async fn stats(
        &self,
        query: &ContactQuery,
        by: StatsBy,
    ) -> Result<BTreeMap<String, u64>, IndexError> {
        let query = query.clone();
        self.blocking(move |inner| {
            let field = match by {
                StatsBy::Cadre => "cadre",
                StatsBy::Region => "region",
                StatsBy::District => "district",
                StatsBy::Gender => "gender",
                StatsBy::Status => "status",
            };
            let request: Aggregations = serde_json::from_value(serde_json::json!({
                "by": { "terms": { "field": field, "size": 65000 } }
            }))
            .map_err(backend)?;
            let collector = AggregationCollector::from_aggs(
                request,
                AggContextParams::new(
                    AggregationLimitsGuard::default(),
                    inner.index.tokenizers().clone(),
                ),
            );
            let searcher = inner.reader.searcher();
            let result = searcher
                .search(&to_query(inner, &query), &collector)
                .map_err(backend)?;
            let json = serde_json::to_value(result).map_err(backend)?;
            let mut counts = BTreeMap::new();
            for bucket in json["by"]["buckets"].as_array().into_iter().flatten() {
                if let (Some(key), Some(count)) =
                    (bucket["key"].as_str(), bucket["doc_count"].as_u64())
                {
                    counts.insert(key.to_string(), count);
                }
            }
            Ok(counts)
        })
        .await
    }

    async fn count(&self) -> Result<u64, IndexError> {
        self.blocking(|inner| Ok(inner.reader.searcher().num_docs()))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cadre_held_through_two_roles_is_counted_once() {
        let (_, fields) = schema();
        let job = |code: &str, cadre: &str| crate::index::JobRef {
            code: code.into(),
            display: None,
            cadre: Some(cadre.into()),
            cadre_display: None,
        };
        let document = ContactDocument {
            reference: "Practitioner/p".into(),
            resource_type: "Practitioner".into(),
            id: "p".into(),
            name: None,
            names: vec![],
            phones: vec![],
            urn_schemes: vec![],
            language: None,
            gender: None,
            active: true,
            opted_out: false,
            rapidpro_contact: None,
            sync_state: "pending".into(),
            invalid_phones: 0,
            jobs: vec![
                job("2230-1B", "nurse"),
                job("2221-1D", "doctor"),
                job("2230-2B", "nurse"),
            ],
            places: vec![],
            organizations: vec![],
            groups: vec![],
            last_message: None,
            last_reply: None,
        };
        let doc = tantivy_document(&fields, &document).unwrap();
        let cadres: Vec<&str> = doc
            .get_all(fields.cadre)
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(cadres, vec!["doctor", "nurse"]);
    }

    #[test]
    fn phone_endings_start_at_four_digits() {
        use crate::index::phone_endings;
        assert_eq!(
            phone_endings("+2317701"),
            vec!["2317701", "317701", "17701", "7701"]
        );
        assert!(phone_endings("+123").is_empty());
    }
}
