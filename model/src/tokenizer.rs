//! Tokenizer and chat template: from `tokenizer.json` + `tokenizer_config.json`, or from GGUF
//! metadata (including SmolLM's digit-splitting pre-tokenizer).

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::AddedToken;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Tokens that end a turn or a document in the model families we load.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
];

/// A tokenizer with the model's end-of-sequence ids and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer. `eos_ids` are extended with every known end-of-turn
    /// token present in the vocabulary.
    pub fn new(
        inner: tokenizers::Tokenizer,
        mut eos_ids: Vec<u32>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Self {
        for t in END_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                eos_ids.push(id);
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Self {
            inner,
            eos_ids,
            bos_token,
            eos_token,
            chat_template,
        }
    }

    /// Builds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let meta = |k: &str| ct.metadata.get(k);
        let pre = meta("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let inner = if pre == "smollm" {
            smollm_from_gguf(ct)?
        } else {
            use candle_core::quantized::tokenizer::TokenizerFromGguf;
            tokenizers::Tokenizer::from_gguf(ct).map_err(tok_err)?
        };
        let id = |k: &str| meta(k).and_then(|v| v.to_u32().ok());
        let name = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let bos = name(id("tokenizer.ggml.bos_token_id"));
        let eos = name(eos_id);
        let template = meta("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Self::new(
            inner,
            eos_id.into_iter().collect(),
            bos,
            eos,
            template,
        ))
    }

    /// Loads `tokenizer.json`, and `tokenizer_config.json` beside it when present.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::io(
                &path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::malformed("tokenizer.json", &path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::malformed("tokenizer_config.json", &cfg_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(ModelError::io(&cfg_path, e)),
        };
        let token = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content")?.as_str().map(str::to_string),
            }
        };
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let mut eos_ids = Vec::new();
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => {
                        eos_ids.extend(n.as_u64().map(|x| x as u32))
                    }
                    Some(serde_json::Value::Array(a)) => {
                        eos_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
        }
        Ok(Self::new(
            inner,
            eos_ids,
            token("bos_token"),
            token("eos_token"),
            template,
        ))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save_dir(&self, dir: &std::path::Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner.save(&path, false).map_err(tok_err)?;
        let cfg = serde_json::json!({
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
        });
        let cfg_path = dir.join("tokenizer_config.json");
        std::fs::write(&cfg_path, cfg.to_string()).map_err(|e| ModelError::io(cfg_path, e))
    }

    /// Token ids of `text`. With `add_special_tokens`, the model's post-processor (e.g. a BOS
    /// token) is applied; special tokens written in the text are always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= self.vocab_size()) {
            return Err(ModelError::TokenOutOfVocab {
                id,
                vocab_size: self.vocab_size(),
            });
        }
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    /// The vocabulary entry of `id` (e.g. `Ġthe`), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end a sequence (EOS and end-of-turn tokens).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The raw chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders `messages` with the model's chat template (Jinja, as in `tokenizer_config.json`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::ChatTemplate("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
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
        env.add_template("chat", source)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| ModelError::ChatTemplate(e.to_string()))
    }
}

/// SmolLM's byte-level BPE: digits split one by one, then GPT-2 byte-level splitting without a
/// prefix space (as in its `tokenizer.json`).
fn smollm_from_gguf(ct: &gguf_file::Content) -> Result<tokenizers::Tokenizer> {
    let strings = |key: &str| -> Result<Vec<String>> {
        let v = ct
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata `{key}` is missing")))?;
        v.to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|x| x.to_string().cloned().map_err(tok_err))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| ModelError::Tokenizer(format!("invalid merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(tok_err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tok.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
    tok.with_post_processor(Some(ByteLevelProcessor::new(true, false, true)));
    if let Some(types) = ct.metadata.get("tokenizer.ggml.token_type") {
        let types = types.to_vec().map_err(tok_err)?;
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
            .filter(|(_, t)| matches!(t.to_i32(), Ok(2..=5)))
            .filter_map(|(i, _)| tokens.get(i))
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        tok.add_special_tokens(specials).map_err(tok_err)?;
    }
    Ok(tok)
}
