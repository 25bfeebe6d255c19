//! Several adapters for one loaded base model, switched without reloading it.

use std::collections::BTreeMap;

use super::lora::LoRAAdapter;
use crate::error::{Error, Result};
use crate::models::CausalLm;

/// Named adapters, at most one active on the model at a time. Switching
/// only re-points the linear layers' adapter hooks; base weights stay put.
#[derive(Debug, Default)]
pub struct AdapterRegistry {
    adapters: BTreeMap<String, LoRAAdapter>,
    active: Option<String>,
}

impl AdapterRegistry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an adapter under `name`.
    pub fn insert(&mut self, name: &str, adapter: LoRAAdapter) {
        self.adapters.insert(name.to_string(), adapter);
    }

    /// Removes an adapter; detaches it from `model` first when it is active.
    pub fn remove(&mut self, name: &str, model: &mut dyn CausalLm) -> Option<LoRAAdapter> {
        if self.active.as_deref() == Some(name) {
            self.deactivate(model);
        }
        self.adapters.remove(name)
    }

    /// The adapter under `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&LoRAAdapter> {
        self.adapters.get(name)
    }

    /// Registered names, sorted.
    #[must_use]
    pub fn names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    /// The active adapter's name.
    #[must_use]
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// Makes `name` the model's adapter (replacing the active one).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown name or an adapter that does
    /// not fit the model (the model then has no adapter).
    pub fn activate(&mut self, name: &str, model: &mut dyn CausalLm) -> Result<()> {
        let adapter = self
            .adapters
            .get(name)
            .ok_or_else(|| Error::InvalidInput(format!("no adapter named `{name}`")))?;
        LoRAAdapter::detach(model);
        self.active = None;
        adapter.attach(model)?;
        self.active = Some(name.to_string());
        Ok(())
    }

    /// Back to the plain base model.
    pub fn deactivate(&mut self, model: &mut dyn CausalLm) {
        LoRAAdapter::detach(model);
        self.active = None;
    }
}
