//! `RapidProDirectory`: the contact sync's view of RapidPro
//! ([`ContactDirectory`]) and the group sync's ([`GroupDirectory`]) over
//! the API v2 client. Creates the `globalid`
//! and `mheroentitytype` contact fields on first use (once per process).

use std::collections::BTreeMap;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::OnceCell;

use super::contact_sync::{ContactDirectory, RemoteContact, SyncError};
use super::group_sync::{GroupDirectory, RemoteGroup};
use crate::pipeline::contact::ContactDraft;
use crate::rapidpro::client::{ContactLookup, ContactQuery, RapidProClient, RapidProError};
use crate::rapidpro::types::{
    Contact, ContactAction, ContactActionRequest, ContactStatus, ContactWrite, FieldType,
    FieldWrite,
};

/// The contact fields the connector owns.
pub const GLOBAL_ID_FIELD: &str = "globalid";
pub const ENTITY_TYPE_FIELD: &str = "mheroentitytype";

/// Create the connector's contact fields (and the `extra` ones) in
/// RapidPro if they are missing.
pub async fn ensure_contact_fields(
    client: &RapidProClient,
    extra: &[String],
) -> Result<(), SyncError> {
    let keys = [GLOBAL_ID_FIELD, ENTITY_TYPE_FIELD]
        .into_iter()
        .chain(extra.iter().map(String::as_str));
    for key in keys {
        let existing = client
            .fields(Some(key))
            .next()
            .await
            .transpose()
            .map_err(rapidpro_error)?;
        if existing.is_none() {
            let field = FieldWrite {
                name: key.to_string(),
                field_type: FieldType::Text,
            };
            client.create_field(&field).await.map_err(rapidpro_error)?;
        }
    }
    Ok(())
}

pub struct RapidProDirectory {
    client: RapidProClient,
    fields_ready: OnceCell<()>,
    extra_fields: Vec<String>,
}

fn rapidpro_error(error: RapidProError) -> SyncError {
    // RapidPro's messages may quote URNs: keep whole phone numbers out.
    SyncError::RapidPro(crate::telemetry::redact_phones(&error.to_string()))
}

fn remote(contact: Contact) -> RemoteContact {
    RemoteContact {
        global_id: contact.fields.get(GLOBAL_ID_FIELD).cloned().flatten(),
        blocked: contact.status == Some(ContactStatus::Blocked),
        uuid: contact.uuid,
        urns: contact.urns,
    }
}

fn contact_write(draft: &ContactDraft) -> ContactWrite {
    let mut fields = BTreeMap::from([
        (GLOBAL_ID_FIELD.to_string(), Some(draft.global_id.clone())),
        (
            ENTITY_TYPE_FIELD.to_string(),
            Some(draft.entity_type.clone()),
        ),
    ]);
    for (key, value) in &draft.extra_fields {
        fields.insert(key.clone(), Some(value.clone()));
    }
    ContactWrite {
        name: draft.name.clone(),
        language: draft.language.clone(),
        urns: Some(draft.urns.clone()),
        groups: None,
        fields: Some(fields),
        note: None,
    }
}

impl RapidProDirectory {
    pub fn new(client: RapidProClient) -> Self {
        RapidProDirectory {
            client,
            fields_ready: OnceCell::new(),
            extra_fields: Vec::new(),
        }
    }

    /// Also derive and send these contact fields (see `pipeline::work_context`).
    pub fn with_extra_fields(mut self, fields: Vec<String>) -> Self {
        self.extra_fields = fields;
        self
    }

    async fn ensure_fields(&self) -> Result<(), SyncError> {
        self.fields_ready
            .get_or_try_init(|| ensure_contact_fields(&self.client, &self.extra_fields))
            .await?;
        Ok(())
    }

    async fn first(&self, query: ContactQuery) -> Result<Option<RemoteContact>, SyncError> {
        let page = self
            .client
            .contacts_page(&query, None)
            .await
            .map_err(rapidpro_error)?;
        Ok(page.results.into_iter().next().map(remote))
    }

    async fn action(&self, uuid: &str, action: ContactAction) -> Result<(), SyncError> {
        let request = ContactActionRequest {
            contacts: vec![uuid.to_string()],
            action,
            group: None,
        };
        self.client
            .contact_actions(&request)
            .await
            .map_err(rapidpro_error)
    }
}

#[async_trait]
impl ContactDirectory for RapidProDirectory {
    async fn find_by_uuid(&self, uuid: &str) -> Result<Option<RemoteContact>, SyncError> {
        self.first(ContactQuery {
            uuid: Some(uuid.to_string()),
            ..Default::default()
        })
        .await
    }

    async fn find_by_urn(&self, urn: &str) -> Result<Option<RemoteContact>, SyncError> {
        self.first(ContactQuery {
            urn: Some(urn.to_string()),
            ..Default::default()
        })
        .await
    }

    async fn create(&self, draft: &ContactDraft) -> Result<RemoteContact, SyncError> {
        self.ensure_fields().await?;
        match self.client.create_contact(&contact_write(draft)).await {
            Ok(contact) => Ok(remote(contact)),
            Err(RapidProError::Invalid(errors))
                if errors
                    .urn_errors()
                    .iter()
                    .any(|(_, message)| message.contains("in use")) =>
            {
                Err(SyncError::UrnTaken)
            }
            Err(e) => Err(rapidpro_error(e)),
        }
    }

    async fn update(&self, uuid: &str, draft: &ContactDraft) -> Result<RemoteContact, SyncError> {
        self.ensure_fields().await?;
        match self
            .client
            .update_contact(
                &ContactLookup::Uuid(uuid.to_string()),
                &contact_write(draft),
            )
            .await
        {
            Ok((_, contact)) => Ok(remote(contact)),
            Err(RapidProError::NotFound { .. }) => Err(SyncError::ContactNotFound),
            Err(e) => Err(rapidpro_error(e)),
        }
    }

    async fn block(&self, uuid: &str) -> Result<(), SyncError> {
        self.action(uuid, ContactAction::Block).await
    }

    async fn unblock(&self, uuid: &str) -> Result<(), SyncError> {
        self.action(uuid, ContactAction::Unblock).await
    }

    fn extra_fields(&self) -> &[String] {
        &self.extra_fields
    }
}

fn remote_group(group: crate::rapidpro::types::Group) -> RemoteGroup {
    RemoteGroup {
        uuid: group.uuid,
        name: group.name,
        smart: group.query.as_deref().is_some_and(|q| !q.is_empty()),
        system: group.system,
    }
}

#[async_trait]
impl GroupDirectory for RapidProDirectory {
    async fn groups(&self) -> Result<Vec<RemoteGroup>, SyncError> {
        let mut stream = self.client.groups(None);
        let mut groups = Vec::new();
        while let Some(group) = stream.next().await {
            groups.push(remote_group(group.map_err(rapidpro_error)?));
        }
        Ok(groups)
    }

    async fn create_group(&self, name: &str) -> Result<RemoteGroup, SyncError> {
        self.client
            .create_group(name)
            .await
            .map(remote_group)
            .map_err(rapidpro_error)
    }

    async fn rename_group(&self, group_uuid: &str, name: &str) -> Result<RemoteGroup, SyncError> {
        match self.client.update_group(group_uuid, name).await {
            Ok(group) => Ok(remote_group(group)),
            Err(RapidProError::Invalid(errors)) => Err(SyncError::Refused(
                crate::telemetry::redact_phones(&errors.to_string()),
            )),
            Err(e) => Err(rapidpro_error(e)),
        }
    }

    async fn group_members(&self, group_uuid: &str) -> Result<Vec<String>, SyncError> {
        let query = ContactQuery {
            group: Some(group_uuid.to_string()),
            ..Default::default()
        };
        let mut stream = self.client.contacts(&query);
        let mut members = Vec::new();
        while let Some(contact) = stream.next().await {
            members.push(contact.map_err(rapidpro_error)?.uuid);
        }
        Ok(members)
    }

    async fn add_to_group(&self, group_uuid: &str, contacts: &[String]) -> Result<(), SyncError> {
        self.group_action(group_uuid, contacts, ContactAction::Add)
            .await
    }

    async fn remove_from_group(
        &self,
        group_uuid: &str,
        contacts: &[String],
    ) -> Result<(), SyncError> {
        self.group_action(group_uuid, contacts, ContactAction::Remove)
            .await
    }
}

impl RapidProDirectory {
    async fn group_action(
        &self,
        group_uuid: &str,
        contacts: &[String],
        action: ContactAction,
    ) -> Result<(), SyncError> {
        if contacts.is_empty() {
            return Ok(());
        }
        let request = ContactActionRequest {
            contacts: contacts.to_vec(),
            action,
            group: Some(group_uuid.to_string()),
        };
        self.client
            .contact_actions(&request)
            .await
            .map_err(rapidpro_error)
    }
}
