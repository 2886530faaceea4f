"""Project facts used by the package. The repository URL must equal ``repository.url`` in ``_config.yml``
(a test checks this, and that every notebook's setup cell installs from it)."""

__version__ = "0.1.0"
REPOSITORY_URL = "https://github.com/llm-book-zh/llm-theory-practice"
