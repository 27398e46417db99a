"""The models the ring trains, as pipeline layer lists: GPT-2 (``gpt2``), Transformer-XL (``xl``),
the Llama-style families built from ``transformers``' own layers (``families``), and the contexts
every engine runs layers under (``context``: seeded init, keyed dropout, recurrent memory).
Imports torch and transformers; not DeepSpeed, nor the other layers of this package."""
