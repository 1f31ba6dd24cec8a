"""llmjax: every stage of LLM training as pure JAX functions.

Array names end in their shape, one letter a dimension, with one alphabet for the whole codebase (`logits_BTV`):
  B batch rows          T sequence (query) length    S key/value length (cache slots)    D model width
  F MLP width           V vocabulary                 N query heads    K key/value heads   H head width
  L layers              P prompt length              R response (generated) length
  C candidates per prompt (ranked responses, a GRPO group's samples)    G groups    Q pairs of a ranked list
  M microbatches
  E experts    X a token's chosen experts (top_k)    A routed copies of tokens (token, choice)    U an expert's slots
  J pages of a paged KV cache's pool    Z tokens a page holds    I pages a row's page table holds
A digit is a dimension of that size (`mask_B1TS`).
"""
