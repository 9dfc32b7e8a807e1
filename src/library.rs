//! The rules and templates in use, loaded as one unit and swapped atomically
//! on hot reload. A broken edit is reported and the last good set keeps running.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::engine::{Known, RuleSet};
use crate::templates::Templates;

/// Rules and the templates they were checked against.
#[derive(Debug)]
pub struct Library {
    pub rules: Arc<RuleSet>,
    pub templates: Arc<Templates>,
}

impl Library {
    /// Loads both directories; any error in either rejects the whole set,
    /// returning every error as `FILE:LINE:COL: message`.
    pub fn load(config: &Config) -> Result<Self, Vec<String>> {
        let (library, errors) = Self::load_lenient(config);
        if errors.is_empty() {
            Ok(library)
        } else {
            Err(errors)
        }
    }

    /// Loads what is valid and returns the errors of the rest.
    pub fn load_lenient(config: &Config) -> (Self, Vec<String>) {
        let (templates, template_errors) = Templates::load(&config.templates.dir);
        let known = Known {
            templates: Some(Arc::new(templates.names())),
            webhooks: Some(Arc::new(config.webhooks.keys().cloned().collect())),
        };
        let (rules, rule_errors) = RuleSet::load(&config.rules.dir, known);
        // Each error with its source line and a caret (`Diagnostic::pretty`).
        let mut errors: Vec<String> = template_errors.iter().map(|e| e.pretty()).collect();
        errors.extend(rule_errors.iter().map(|e| e.pretty()));
        if !templates.contains(crate::deliver::ESCALATION_TEMPLATE) {
            errors.push(format!(
                "{}:1:1: missing the escalation notice template, which escalate() needs",
                config.templates.dir.join("escalation.txt").display()
            ));
        }
        (
            Self {
                rules: Arc::new(rules),
                templates: Arc::new(templates),
            },
            errors,
        )
    }

    /// A library from parts already loaded.
    pub fn from_parts(rules: Arc<RuleSet>, templates: Arc<Templates>) -> Self {
        Self { rules, templates }
    }
}

/// The current library, shared by the scheduler, delivery and the API.
#[derive(Debug)]
pub struct LibraryHandle {
    current: RwLock<Arc<Library>>,
}

impl LibraryHandle {
    pub fn new(library: Library) -> Self {
        Self {
            current: RwLock::new(Arc::new(library)),
        }
    }

    pub fn current(&self) -> Arc<Library> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn replace(&self, library: Library) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(library);
    }
}

/// A cheap fingerprint of the files in some directories (names, sizes,
/// modification times): it changes when any file is added, removed or edited.
pub fn fingerprint(dirs: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for dir in dirs {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(Result::ok).collect())
            .unwrap_or_default();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            e.file_name().hash(&mut h);
            if let Ok(m) = e.metadata() {
                m.len().hash(&mut h);
                m.modified().ok().hash(&mut h);
            }
        }
    }
    h.finish()
}
