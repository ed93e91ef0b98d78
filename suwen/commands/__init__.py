"""The command-line layer: each module registers its commands on the root app, parses arguments
and renders results with rich. No retrieval, agent or model logic lives here."""
