//! Decoder, layer plans, sampling, log-probs and loading.
