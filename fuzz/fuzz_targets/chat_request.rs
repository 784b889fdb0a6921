//! Fuzz target: see `ape_attn_fuzz::targets::chat_request`.
#![no_main]

ape_attn_fuzz::bounded_target!(ape_attn_fuzz::targets::chat_request);
