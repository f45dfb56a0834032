"""Built-in agent modules (entry-point group ``balsam.agent_modules``)."""
