"""Small, tested shims for third-party packages that break on current dependencies.
Each module patches one thing, only when it is missing, and says why. Importing a module
here patches nothing: the code that needs a shim calls it (idempotent) right before it
imports the package that needs it (:func:`dp_sweeps.classical.import_diffprivlib`,
:func:`dp_sweeps.data.features.scattering.scattering_module`)."""
