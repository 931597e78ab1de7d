"""Front doors for other pipelines: dipy, OSIPI TF2.4 and osipy users switch with one line.

Each submodule speaks one peer's language (its names, parameter order, units and errors),
converts at its edge and calls fastivim's public API; none holds fitting logic:

* :mod:`fastivim.interop.dipy`: ``IvimModel(gtab).fit(data)`` like ``dipy.reconst.ivim``;
* :mod:`fastivim.interop.osipi`: ``osipi_algorithm(OsipiBase, method, name)``, a standardized
  algorithm class for the OSIPI TF2.4 IVIM code collection;
* :mod:`fastivim.interop.osipy`: ``load_nifti``, ``fit_ivim``, ``export_bids`` and
  :mod:`fastivim.interop.osipy.ivim` like osipy's IVIM tutorial.

Importing this package imports none of them (and never dipy, osipy or OSIPI code: the
adapters need none of it).
"""
