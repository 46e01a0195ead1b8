"""``python -m laplace_tf`` runs the ``laplace-tf`` command."""

from laplace_tf.cli import main

raise SystemExit(main())
