//! The one table of search parameters.
//!
//! Every parameter the embedded store can search is declared here once:
//! its name, its type and a FHIRPath-like path. Index rows are extracted
//! from it at write time (`fhir::extract`), queries are planned from it
//! (`store::sqlite::search`), and the CapabilityStatement is generated
//! from it (`fhir::capability`). Includes allowed by `_include` and
//! `_revinclude` are declared here too.
//!
//! Path syntax: `a.b.c` walks object keys (arrays are flattened);
//! `a.where(k='v')` keeps elements whose `k` equals `v`; alternatives are
//! separated by ` | ` (e.g. choice types `occurrenceDateTime |
//! occurrencePeriod`).

/// Search parameter types the store implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Reference,
    Date,
    /// An absolute URI matched exactly (e.g. `_profile`, `url`).
    Uri,
}

impl ParamKind {
    pub fn fhir_code(self) -> &'static str {
        match self {
            ParamKind::Token => "token",
            ParamKind::String => "string",
            ParamKind::Reference => "reference",
            ParamKind::Date => "date",
            ParamKind::Uri => "uri",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SearchParamDef {
    /// Resource types the parameter applies to (`*` = every type).
    pub resource_types: &'static [&'static str],
    pub name: &'static str,
    pub kind: ParamKind,
    pub path: &'static str,
    pub description: &'static str,
}

const PERSON_TYPES: &[&str] = &["Practitioner", "Patient", "Person", "RelatedPerson"];

macro_rules! param {
    ($types:expr, $name:literal, $kind:ident, $path:literal, $doc:literal) => {
        SearchParamDef {
            resource_types: $types,
            name: $name,
            kind: ParamKind::$kind,
            path: $path,
            description: $doc,
        }
    };
}

/// Parameters handled from the resource's own columns rather than index rows.
pub const COLUMN_PARAMS: &[SearchParamDef] = &[
    param!(&["*"], "_id", Token, "id", "Logical id of the resource"),
    param!(
        &["*"],
        "_lastUpdated",
        Date,
        "meta.lastUpdated",
        "When the resource version last changed"
    ),
];

/// Every indexed search parameter.
pub const SEARCH_PARAMS: &[SearchParamDef] = &[
    param!(
        &["*"],
        "_tag",
        Token,
        "meta.tag",
        "Tags applied to the resource"
    ),
    param!(
        &["*"],
        "_profile",
        Uri,
        "meta.profile",
        "Profiles the resource claims to conform to"
    ),
    // Person types
    param!(
        PERSON_TYPES,
        "identifier",
        Token,
        "identifier",
        "An identifier of the person"
    ),
    param!(
        PERSON_TYPES,
        "name",
        String,
        "name",
        "Any part of a name (family, given, prefix, suffix, text)"
    ),
    param!(PERSON_TYPES, "family", String, "name.family", "Family name"),
    param!(PERSON_TYPES, "given", String, "name.given", "Given name"),
    param!(
        PERSON_TYPES,
        "telecom",
        Token,
        "telecom",
        "Any contact point value"
    ),
    param!(
        PERSON_TYPES,
        "phone",
        Token,
        "telecom.where(system='phone') | telecom.where(system='sms')",
        "A phone number"
    ),
    param!(
        PERSON_TYPES,
        "email",
        Token,
        "telecom.where(system='email')",
        "An email address"
    ),
    param!(
        PERSON_TYPES,
        "active",
        Token,
        "active",
        "Whether the record is active"
    ),
    param!(
        PERSON_TYPES,
        "gender",
        Token,
        "gender",
        "Administrative gender"
    ),
    param!(
        &["Patient", "RelatedPerson"],
        "patient",
        Reference,
        "patient",
        "The patient this person is related to"
    ),
    // Group
    param!(
        &["Group"],
        "member",
        Reference,
        "member.entity",
        "A member of the group"
    ),
    param!(&["Group"], "code", Token, "code", "The kind of group"),
    param!(
        &["Group"],
        "type",
        Token,
        "type",
        "person | practitioner | ..."
    ),
    param!(&["Group"], "name", String, "name", "Name of the group"),
    param!(
        &["Group"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the group"
    ),
    // PractitionerRole
    param!(
        &["PractitionerRole"],
        "practitioner",
        Reference,
        "practitioner",
        "The practitioner in the role"
    ),
    param!(
        &["PractitionerRole"],
        "location",
        Reference,
        "location",
        "Where the role is performed"
    ),
    param!(
        &["PractitionerRole"],
        "organization",
        Reference,
        "organization",
        "The organization of the role"
    ),
    param!(
        &["PractitionerRole"],
        "service",
        Reference,
        "healthcareService",
        "The healthcare services of the role"
    ),
    param!(
        &["PractitionerRole"],
        "role",
        Token,
        "code",
        "The role (job, cadre)"
    ),
    param!(
        &["PractitionerRole"],
        "specialty",
        Token,
        "specialty",
        "A specialty of the role"
    ),
    param!(
        &["PractitionerRole"],
        "active",
        Token,
        "active",
        "Whether the role is active"
    ),
    param!(
        &["PractitionerRole"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the role"
    ),
    param!(
        &["PractitionerRole"],
        "date",
        Date,
        "period",
        "The period the role is valid"
    ),
    // Location
    param!(
        &["Location"],
        "name",
        String,
        "name | alias",
        "Name or alias of the location"
    ),
    param!(
        &["Location"],
        "partof",
        Reference,
        "partOf",
        "The location this one is part of"
    ),
    param!(&["Location"], "type", Token, "type", "Type of location"),
    param!(
        &["Location"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the location"
    ),
    param!(
        &["Location"],
        "organization",
        Reference,
        "managingOrganization",
        "The managing organization"
    ),
    param!(
        &["Location"],
        "status",
        Token,
        "status",
        "active | suspended | inactive"
    ),
    // Organization
    param!(
        &["Organization"],
        "name",
        String,
        "name | alias",
        "Name or alias of the organization"
    ),
    param!(
        &["Organization"],
        "partof",
        Reference,
        "partOf",
        "The organization this one is part of"
    ),
    param!(
        &["Organization"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the organization"
    ),
    param!(
        &["Organization"],
        "type",
        Token,
        "type",
        "Type of organization"
    ),
    param!(
        &["Organization"],
        "active",
        Token,
        "active",
        "Whether the organization is active"
    ),
    // HealthcareService
    param!(
        &["HealthcareService"],
        "name",
        String,
        "name",
        "Name of the service"
    ),
    param!(
        &["HealthcareService"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the service"
    ),
    param!(
        &["HealthcareService"],
        "location",
        Reference,
        "location",
        "Where the service is provided"
    ),
    param!(
        &["HealthcareService"],
        "organization",
        Reference,
        "providedBy",
        "The organization providing the service"
    ),
    // CommunicationRequest
    param!(
        &["CommunicationRequest"],
        "status",
        Token,
        "status",
        "Status of the request"
    ),
    param!(
        &["CommunicationRequest"],
        "recipient",
        Reference,
        "recipient",
        "A recipient"
    ),
    param!(
        &["CommunicationRequest"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the request"
    ),
    param!(
        &["CommunicationRequest"],
        "group-identifier",
        Token,
        "groupIdentifier",
        "Identifier shared by requests of one submission"
    ),
    param!(
        &["CommunicationRequest"],
        "category",
        Token,
        "category",
        "Message category"
    ),
    param!(
        &["CommunicationRequest"],
        "occurrence",
        Date,
        "occurrenceDateTime | occurrencePeriod",
        "When the communication is to happen"
    ),
    param!(
        &["CommunicationRequest"],
        "authored",
        Date,
        "authoredOn",
        "When the request was authored"
    ),
    param!(
        &["CommunicationRequest"],
        "requester",
        Reference,
        "requester",
        "Who asked for the communication"
    ),
    param!(
        &["CommunicationRequest"],
        "priority",
        Token,
        "priority",
        "routine | urgent | asap | stat"
    ),
    param!(
        &["CommunicationRequest"],
        "based-on",
        Reference,
        "basedOn",
        "The request this one fulfils (a schedule's firings name the schedule)"
    ),
    // Communication
    param!(
        &["Communication"],
        "based-on",
        Reference,
        "basedOn",
        "The request this communication fulfils"
    ),
    param!(
        &["Communication"],
        "part-of",
        Reference,
        "partOf",
        "The event this communication is part of"
    ),
    param!(
        &["Communication"],
        "status",
        Token,
        "status",
        "Status of the communication"
    ),
    param!(
        &["Communication"],
        "recipient",
        Reference,
        "recipient",
        "A recipient"
    ),
    param!(
        &["Communication"],
        "sender",
        Reference,
        "sender",
        "The sender"
    ),
    param!(&["Communication"], "sent", Date, "sent", "When it was sent"),
    param!(
        &["Communication"],
        "received",
        Date,
        "received",
        "When it was received"
    ),
    param!(
        &["Communication"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the communication"
    ),
    param!(
        &["Communication"],
        "category",
        Token,
        "category",
        "Message category"
    ),
    // QuestionnaireResponse
    param!(
        &["QuestionnaireResponse"],
        "subject",
        Reference,
        "subject",
        "Who or what the answers are about"
    ),
    param!(
        &["QuestionnaireResponse"],
        "questionnaire",
        Uri,
        "questionnaire",
        "The questionnaire (canonical URL)"
    ),
    param!(
        &["QuestionnaireResponse"],
        "status",
        Token,
        "status",
        "Status of the response"
    ),
    param!(
        &["QuestionnaireResponse"],
        "authored",
        Date,
        "authored",
        "When the answers were given"
    ),
    param!(
        &["QuestionnaireResponse"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the response"
    ),
    // Basic
    param!(&["Basic"], "code", Token, "code", "Kind of resource"),
    param!(
        &["Basic"],
        "subject",
        Reference,
        "subject",
        "What the resource is about"
    ),
    param!(
        &["Basic"],
        "identifier",
        Token,
        "identifier",
        "An identifier of the resource"
    ),
    // Canonical resources
    param!(
        &[
            "Questionnaire",
            "CodeSystem",
            "ValueSet",
            "StructureDefinition",
            "SearchParameter"
        ],
        "url",
        Uri,
        "url",
        "Canonical URL"
    ),
    param!(
        &[
            "Questionnaire",
            "CodeSystem",
            "ValueSet",
            "StructureDefinition",
            "SearchParameter"
        ],
        "name",
        String,
        "name",
        "Computer-friendly name"
    ),
    param!(
        &[
            "Questionnaire",
            "CodeSystem",
            "ValueSet",
            "StructureDefinition",
            "SearchParameter",
            "Subscription"
        ],
        "status",
        Token,
        "status",
        "Status"
    ),
    param!(
        &["Questionnaire", "CodeSystem", "ValueSet"],
        "identifier",
        Token,
        "identifier",
        "An identifier"
    ),
    // Provenance, AuditEvent
    param!(
        &["Provenance"],
        "target",
        Reference,
        "target",
        "The resource the provenance is about"
    ),
    param!(
        &["Provenance"],
        "recorded",
        Date,
        "recorded",
        "When the activity was recorded"
    ),
    param!(
        &["AuditEvent"],
        "date",
        Date,
        "recorded",
        "When the event was recorded"
    ),
    param!(
        &["AuditEvent"],
        "entity",
        Reference,
        "entity.what",
        "A resource the event is about"
    ),
];

/// An allowed `_include` (and, read backwards, `_revinclude`):
/// `source:param` pointing at `target`.
#[derive(Debug, Clone, Copy)]
pub struct IncludeDef {
    pub source: &'static str,
    pub param: &'static str,
    pub targets: &'static [&'static str],
}

pub const INCLUDES: &[IncludeDef] = &[
    IncludeDef {
        source: "PractitionerRole",
        param: "practitioner",
        targets: &["Practitioner"],
    },
    IncludeDef {
        source: "PractitionerRole",
        param: "location",
        targets: &["Location"],
    },
    IncludeDef {
        source: "PractitionerRole",
        param: "organization",
        targets: &["Organization"],
    },
    IncludeDef {
        source: "Group",
        param: "member",
        targets: &[
            "Practitioner",
            "Patient",
            "Person",
            "RelatedPerson",
            "PractitionerRole",
            "Group",
            "Location",
            "Organization",
            "HealthcareService",
        ],
    },
    IncludeDef {
        source: "Location",
        param: "partof",
        targets: &["Location"],
    },
    IncludeDef {
        source: "Communication",
        param: "based-on",
        targets: &["CommunicationRequest"],
    },
];

fn applies(def: &SearchParamDef, resource_type: &str) -> bool {
    def.resource_types
        .iter()
        .any(|t| *t == "*" || *t == resource_type)
}

/// The indexed parameters of one type.
pub fn params_for(resource_type: &str) -> impl Iterator<Item = &'static SearchParamDef> + '_ {
    SEARCH_PARAMS
        .iter()
        .filter(move |d| applies(d, resource_type))
}

/// Look up a parameter (indexed or column) by name for a type.
pub fn find(resource_type: &str, name: &str) -> Option<&'static SearchParamDef> {
    COLUMN_PARAMS
        .iter()
        .chain(SEARCH_PARAMS.iter())
        .find(|d| d.name == name && applies(d, resource_type))
}

/// Every parameter name of a type, for error messages.
pub fn names_for(resource_type: &str) -> Vec<&'static str> {
    COLUMN_PARAMS
        .iter()
        .chain(SEARCH_PARAMS.iter())
        .filter(|d| applies(d, resource_type))
        .map(|d| d.name)
        .collect()
}

pub fn find_include(source: &str, param: &str) -> Option<&'static IncludeDef> {
    INCLUDES
        .iter()
        .find(|i| i.source == source && i.param == param)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::resource_types::SUPPORTED;

    #[test]
    fn every_declared_type_is_supported_and_names_are_unique_per_type() {
        for def in SEARCH_PARAMS {
            for t in def.resource_types {
                assert!(*t == "*" || SUPPORTED.contains(t), "{t} in {}", def.name);
            }
        }
        for t in SUPPORTED {
            let names = names_for(t);
            let mut sorted = names.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(names.len(), sorted.len(), "duplicate parameter on {t}");
        }
    }

    #[test]
    fn includes_name_reference_parameters() {
        for inc in INCLUDES {
            let def = find(inc.source, inc.param).expect("include parameter declared");
            assert_eq!(def.kind, ParamKind::Reference);
        }
    }
}
