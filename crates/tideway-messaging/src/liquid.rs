//! Braze-flavoured Liquid (placeholder until the module lands).
