"""A run folder's network in other formats (``segadapt export``; :mod:`segadapt.export.cli`).

* :mod:`~segadapt.export.merged`: the merged plain network (``--merged``) and the PEFT adapter folder whose base
  is one (``--peft``; the format conversion itself is :mod:`segadapt.adapters.peft`);
* :mod:`~segadapt.export.bundle`: a MONAI bundle (``--bundle``), its preprocessing generated from the run's
  preprocessing spec (:func:`segadapt.data.pipelines.preprocessing_spec`);
* :mod:`~segadapt.export.nnunet`: an nnU-Net v2 trained-model folder of a ``model=nnunet`` run (``--nnunet``);
* :mod:`~segadapt.export.common`: what they share (the run's network, the refusal to write over the run's files).

The package imports nothing itself: ``segadapt export --help`` stays light, and each submodule is imported where used.
"""
