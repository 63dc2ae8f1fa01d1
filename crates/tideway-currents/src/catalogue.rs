//! The catalogue of Currents event types: every type's category and its `user` and
//! `properties` fields with types, parsed from a copy of `reference/currents-events.md`
//! compiled into the binary (`data/currents-events.md`).
//!
//! Used to validate a Current's `event_types`, to expand `categories` into type names, to
//! build the placeholder events of the **send test events** action (one per selected type,
//! placeholder values of the right JSON types, as Braze's samples do), and by the test that
//! checks every event Tideway emits against the reference field lists.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};
use tideway_core::currents::EventCategory;

/// The JSON type of a field, as the reference names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Int,
    Long,
    Float,
    Double,
    Boolean,
    Object,
    Array,
}

impl FieldType {
    fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "string" => FieldType::String,
            "int" => FieldType::Int,
            "long" => FieldType::Long,
            "float" => FieldType::Float,
            "double" => FieldType::Double,
            "boolean" => FieldType::Boolean,
            "object" => FieldType::Object,
            "array" => FieldType::Array,
            _ => return None,
        })
    }

    /// Whether `value` has this type (integers are accepted where floats are).
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            FieldType::String => value.is_string(),
            FieldType::Int => value.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
            FieldType::Long => value.is_i64() || value.is_u64(),
            FieldType::Float | FieldType::Double => value.is_number(),
            FieldType::Boolean => value.is_boolean(),
            FieldType::Object => value.is_object(),
            FieldType::Array => value
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_string)),
        }
    }
}

/// One field of an event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub ty: FieldType,
    pub optional: bool,
}

/// One event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub name: String,
    /// The section it is listed under.
    pub category: EventCategory,
    pub user: Vec<Field>,
    pub properties: Vec<Field>,
}

impl TypeInfo {
    /// Whether a Current subscribed to `category` gets this type. Three customer-behaviour
    /// types are still message engagement in Braze's glossary: either category selects them.
    pub fn in_category(&self, category: EventCategory) -> bool {
        self.category == category
            || (category == EventCategory::MessageEngagement
                && matches!(
                    self.name.as_str(),
                    "users.behaviors.Uninstall"
                        | "users.behaviors.subscription.GlobalStateChange"
                        | "users.behaviors.subscriptiongroup.StateChange"
                ))
    }

    /// A placeholder event of this type: every field present, strings holding their own
    /// name, numbers 0, booleans false, objects empty, arrays `[name]`.
    pub fn placeholder(&self, id: &str, time: i64) -> Value {
        fn fill(fields: &[Field]) -> Map<String, Value> {
            fields
                .iter()
                .map(|f| {
                    let v = match f.ty {
                        FieldType::String => json!(f.name),
                        FieldType::Int | FieldType::Long => json!(0),
                        FieldType::Float | FieldType::Double => json!(0.0),
                        FieldType::Boolean => json!(false),
                        FieldType::Object => json!({}),
                        FieldType::Array => json!([f.name]),
                    };
                    (f.name.clone(), v)
                })
                .collect()
        }
        json!({
            "event_type": self.name,
            "id": id,
            "time": time,
            "user": fill(&self.user),
            "properties": fill(&self.properties),
        })
    }
}

/// Why the reference text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("currents-events.md line {line}: {problem}")]
pub struct CatalogueError {
    pub line: usize,
    pub problem: String,
}

fn parse_fields(list: &str, line: usize) -> Result<Vec<Field>, CatalogueError> {
    let list = list.trim();
    if list.is_empty() || list.starts_with('(') {
        return Ok(Vec::new());
    }
    list.split(',')
        .map(|part| {
            let (name, ty) = part.trim().split_once(':').ok_or_else(|| CatalogueError {
                line,
                problem: format!("field {part:?}"),
            })?;
            let optional = ty.ends_with('?');
            let ty = FieldType::parse(ty.trim_end_matches('?')).ok_or_else(|| CatalogueError {
                line,
                problem: format!("type of {name}: {ty}"),
            })?;
            Ok(Field {
                name: name.trim().to_owned(),
                ty,
                optional,
            })
        })
        .collect()
}

/// Parses the reference's field lists.
pub fn parse(text: &str) -> Result<Vec<TypeInfo>, CatalogueError> {
    let mut types: Vec<TypeInfo> = Vec::new();
    let mut category = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if let Some(heading) = raw.strip_prefix("## ") {
            category = if heading.starts_with("message engagement") {
                Some(EventCategory::MessageEngagement)
            } else if heading.starts_with("customer behavior") {
                Some(EventCategory::CustomerBehavior)
            } else if heading.starts_with("user events") {
                Some(EventCategory::User)
            } else {
                None
            };
        } else if let Some(rest) = raw.strip_prefix("- `") {
            let Some(category) = category else { continue };
            let name = rest.split('`').next().unwrap_or_default();
            types.push(TypeInfo {
                name: name.to_owned(),
                category,
                user: Vec::new(),
                properties: Vec::new(),
            });
        } else if let Some(list) = raw.strip_prefix("  - user:") {
            let t = types.last_mut().ok_or_else(|| CatalogueError {
                line,
                problem: "user list before a type".into(),
            })?;
            t.user = parse_fields(list, line)?;
        } else if let Some(list) = raw.strip_prefix("  - properties:") {
            let t = types.last_mut().ok_or_else(|| CatalogueError {
                line,
                problem: "properties before a type".into(),
            })?;
            t.properties = parse_fields(list, line)?;
        }
    }
    if types.is_empty() {
        return Err(CatalogueError {
            line: 0,
            problem: "no event types".into(),
        });
    }
    Ok(types)
}

/// The compiled-in copy of the reference.
pub const REFERENCE: &str = include_str!("../data/currents-events.md");

static CATALOGUE: LazyLock<Vec<TypeInfo>> = LazyLock::new(|| match parse(REFERENCE) {
    Ok(types) => types,
    Err(e) => {
        // The file is compiled in and parsed by a unit test, so this cannot happen in a
        // tested build; an empty catalogue only disables validation and test events.
        tracing::error!(error = %e, "the compiled-in Currents catalogue does not parse");
        Vec::new()
    }
});

/// Every Currents event type Tideway knows.
pub fn all() -> &'static [TypeInfo] {
    &CATALOGUE
}

pub fn find(name: &str) -> Option<&'static TypeInfo> {
    all().iter().find(|t| t.name == name)
}

/// The type names a set of categories selects.
pub fn names_in(categories: &[EventCategory]) -> Vec<String> {
    all()
        .iter()
        .filter(|t| categories.iter().any(|c| t.in_category(*c)))
        .map(|t| t.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_in_reference_parses_completely() {
        let types = parse(REFERENCE).unwrap();
        assert_eq!(all().len(), types.len());
        let count = |c| types.iter().filter(|t| t.category == c).count();
        assert_eq!(count(EventCategory::MessageEngagement), 80);
        assert_eq!(count(EventCategory::CustomerBehavior), 13);
        assert_eq!(count(EventCategory::User), 3);
        let custom = find("users.behaviors.CustomEvent").unwrap();
        assert!(
            custom
                .properties
                .iter()
                .any(|f| f.name == "custom_properties" && f.ty == FieldType::Object && f.optional)
        );
        assert!(find("agentconsole.ToolInvocation").unwrap().user.is_empty());
        assert!(
            names_in(&[EventCategory::MessageEngagement])
                .contains(&"users.behaviors.Uninstall".to_owned())
        );
    }

    #[test]
    fn placeholders_have_every_field_with_its_type() {
        for t in all() {
            let e = t.placeholder("id", 2_033_802_504);
            for (part, fields) in [("user", &t.user), ("properties", &t.properties)] {
                let obj = e[part].as_object().unwrap();
                assert_eq!(obj.len(), fields.len(), "{} {part}", t.name);
                for f in fields {
                    assert!(f.ty.accepts(&obj[&f.name]), "{} {}", t.name, f.name);
                }
            }
        }
    }
}
