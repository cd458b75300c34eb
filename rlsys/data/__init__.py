"""Your prompts: files read through ``datasets`` (``loading``), checked, chat-templated and
tokenized by the policy's own tokenizer (``prompts``), configured by ``data.*`` (``config``)."""
