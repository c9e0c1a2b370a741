"""Tiny random GroundingDINO, SAM and SAM 2 transformers folders (config + weights + processor files).

Built from configs (no downloads) with the same layout ``save_pretrained`` gives the public weights
(IDEA-Research/grounding-dino-tiny, facebook/sam-vit-base, facebook/sam2.1-hiera-tiny), so the adapters in
dataset_tools/segmenters.py load them through the same code path. Unit tests import these builders by path;
MODELS registers them for ComfyUI workflows under the folders the nodes look in.
"""
from pathlib import Path

import torch

GROUNDING_DINO = "tiny-grounding-dino"
SAM = "tiny-sam"
SAM2 = "tiny-sam2"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "car", "person", "road", "a", "dog", "cat"]


def build_grounding_dino(path, seed=0):
    import transformers as T

    path = Path(path)
    torch.manual_seed(seed)
    config = T.GroundingDinoConfig(
        backbone_config=T.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                     image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=T.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=32),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=8, num_feature_levels=3,
        encoder_n_points=1, decoder_n_points=1, max_text_len=16)
    model = T.GroundingDinoForObjectDetection(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = T.BertTokenizer(str(path / "vocab.txt"))
    processor = T.GroundingDinoProcessor(
        image_processor=T.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def build_sam(path, seed=0):
    import transformers as T

    path = Path(path)
    torch.manual_seed(seed)
    vision = T.SamVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                               output_channels=16, image_size=64, patch_size=16, window_size=2,
                               global_attn_indexes=[1], num_pos_feats=8)
    config = T.SamConfig(
        vision_config=vision,
        prompt_encoder_config=T.SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=T.SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   mlp_dim=32, iou_head_hidden_dim=16))
    model = T.SamModel(config).eval()
    processor = T.SamProcessor(image_processor=T.SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16}))
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def build_sam2(path, seed=0):
    import transformers as T

    path = Path(path)
    torch.manual_seed(seed)
    # a global-attention block must not open a pooled stage, hence two blocks in stage 2
    backbone = T.Sam2HieraDetConfig(
        hidden_size=8, num_attention_heads=1, image_size=[64, 64], blocks_per_stage=[1, 2, 1, 1],
        embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[2], window_positional_embedding_background_size=[2, 2])
    vision = T.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                                backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=32)
    config = T.Sam2Config(
        vision_config=vision,
        prompt_encoder_config=T.Sam2PromptEncoderConfig(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=T.Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=32, num_hidden_layers=1,
                                                    num_attention_heads=2, iou_head_hidden_dim=16))
    model = T.Sam2Model(config).eval()
    processor = T.Sam2Processor(image_processor=T.Sam2ImageProcessor(
        size={"height": 64, "width": 64}, mask_size={"height": 16, "width": 16}))
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


SAM_CHECKPOINT = "tiny_sam_vit.pth"
SEGMENT_ANYTHING_CONFIG = {
    "embed_dim": 16, "patch_size": 16, "img_size": 64, "depth": 2, "num_heads": 2, "global_attn_indexes": [1],
    "window_size": 2, "prompt_embed_dim": 32, "mask_in_chans": 4, "decoder_depth": 1, "decoder_mlp_dim": 32,
    "iou_head_hidden_dim": 16,
}


def build_segment_anything_checkpoint(path, seed=0, **config):
    """An original segment-anything checkpoint (the models/sams layout: a plain state dict in a .pth);
    ``config`` overrides entries of ``SEGMENT_ANYTHING_CONFIG``."""
    from erasekit.dataset_tools.segmenters import build_segment_anything

    torch.manual_seed(seed)
    model = build_segment_anything(None, {**SEGMENT_ANYTHING_CONFIG, **config})
    with open(path, "wb") as handle:
        torch.save(model.state_dict(), handle)
    return Path(path)


# A tiny Hiera at SAM 2's fixed 1024 px input; its global-attention block sits in the smallest stage so
# the CPU never attends over 256×256 tokens. Not a released variant: tests add it to SAM2_VARIANTS.
SAM2_TINY_VARIANT = {"name": "test-tiny", "heads": [1, 1, 1, 1], "windows": [4, 4, 4, 2], "global": [4]}
SAM2_TINY_KEY = (8, (1, 1, 1, 2))


def sam2_checkpoint_config():
    import transformers as T

    backbone = T.Sam2HieraDetConfig(
        hidden_size=8, image_size=[1024, 1024], blocks_per_stage=list(SAM2_TINY_KEY[1]),
        embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=SAM2_TINY_VARIANT["heads"],
        window_size_per_stage=SAM2_TINY_VARIANT["windows"], global_attention_blocks=SAM2_TINY_VARIANT["global"],
        window_positional_embedding_background_size=[2, 2])
    vision = T.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                                backbone_feature_sizes=[[256, 256], [128, 128], [64, 64]], fpn_hidden_size=32)
    return T.Sam2Config(
        vision_config=vision,
        prompt_encoder_config=T.Sam2PromptEncoderConfig(hidden_size=32, image_size=1024, patch_size=16,
                                                        mask_input_channels=4),
        mask_decoder_config=T.Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=32, num_hidden_layers=1,
                                                    num_attention_heads=8, iou_head_hidden_dim=16))


def sam2_original_state(model, version="2.1"):
    """A transformers Sam2Model's weights in Meta's checkpoint layout, with stand-ins for the video parts."""
    from erasekit.dataset_tools.segmenters import rename_sam2_key

    state = {}
    for key, value in model.state_dict().items():
        if key == "shared_image_embedding.positional_embedding":
            continue  # Meta keeps one copy, in the prompt encoder
        if key == "prompt_encoder.point_embed.weight":
            for index, row in enumerate(value):
                state[f"sam_prompt_encoder.point_embeddings.{index}.weight"] = row[None].clone()
            continue
        state[rename_sam2_key(key, reverse=True)] = value.clone()
    # video-only weights every real checkpoint carries; the image model must ignore them
    state["memory_attention.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    state["maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 4)
    if version == "2.1":
        state["no_obj_embed_spatial"] = torch.zeros(1, 4)
        state["obj_ptr_tpos_proj.weight"] = torch.zeros(4, 4)
    return state


def build_sam2_checkpoint(path, seed=0, version="2.1"):
    """A SAM 2 checkpoint as Meta publishes it (``{"model": state}`` in a .pt) or its .safetensors form."""
    import transformers as T

    torch.manual_seed(seed)
    state = sam2_original_state(T.Sam2Model(sam2_checkpoint_config()).eval(), version)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state}, str(path))
    return path


MODELS = {
    ("grounding-dino", GROUNDING_DINO): build_grounding_dino,
    ("sams", SAM): build_sam,
    ("sam2", SAM2): build_sam2,
    ("sams", SAM_CHECKPOINT): build_segment_anything_checkpoint,
}
