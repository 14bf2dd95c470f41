"""finetui terminal UI (Textual). Depends on the engine; the engine never imports it."""
