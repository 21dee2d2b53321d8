"""Provider adapters: one small module per upstream, behind providers.base.Provider."""
