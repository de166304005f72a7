"""The mnemonic task suite (brief §6): encoding, retrieval synthesis, principle abstraction and episode
summarization.

Modules: `schemas` (JSON Schemas, L1 codes), `prompts` (versioned templates), `parse` (answer from a
raw completion), `world`/`events`/`scenarios`/`simulate` (simulated developer work with ground
truth), `match` (finding refs, numbers and names in text), `gate` (the faithfulness gate, L1-L3) and
`suite` (shipped dev/test sets, gold references, corruptions). See docs/tasks.md.
"""
