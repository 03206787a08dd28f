"""One-shot federated collection of domain experts on Flower (needs the `federated` extra).

`run_federation_simulation` / `run_federation_deployment` (run.py) are the entry points; app.py holds the
server and owner logic as plain functions plus the Flower ServerApp / ClientApp objects. Importing this
package does not import Flower.
"""

from .run import run_federation_deployment, run_federation_simulation

__all__ = ["run_federation_deployment", "run_federation_simulation"]
