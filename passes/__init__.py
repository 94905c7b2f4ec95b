"""Graph passes: one module per pass family; third parties register through the "edgeprune.passes" entry-point group."""
