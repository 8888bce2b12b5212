"""Everything that is not a compression algorithm: recipe, registry, runner, metrics, reports, CLI."""
