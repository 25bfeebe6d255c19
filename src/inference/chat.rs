//! Chat templates: the model's own Jinja template (from
//! `tokenizer_config.json` or GGUF metadata) rendered with minijinja, as
//! transformers' `apply_chat_template` does.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (or `tool`).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with any role.
    #[must_use]
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    /// A system message.
    #[must_use]
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
    /// A user message.
    #[must_use]
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    /// An assistant message.
    #[must_use]
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are exposed to it as in transformers.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when the template does not compile.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // Python-style string methods (`.strip()`, `.startswith()`, …) that
        // Hugging Face templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Tokenizer(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where
    /// the assistant's reply starts.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when rendering fails (e.g. the template raises).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::InvalidInput("no chat messages".into()));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::Tokenizer(format!("chat template failed: {e}")))
    }
}
