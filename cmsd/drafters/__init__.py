"""The drafters, one module each, behind one interface (base.Drafter):

    base        the interface, Draft, Sampler, DraftBuffer (one draft as it is collected) and worth_drafting (the cut
                of a single row's tree where a node costs more than it is expected to give)
    ngram       prompt lookup: SuffixIndex, NgramDrafter, NgramTreeDrafter
    model       a separate Hugging Face model (ModelDrafter), and the draft-vocabulary head a distilled drafter uses
    head        the feature head (EAGLE-style): FeatureHead, its loading, HeadDrafter (chains and EAGLE-2 trees)
    selfspec    SpecBound's self-drafter from the target's shallow layers: LayeredState, SelfDrafter, SelfSpecPlan

cmsd.decode.Decoder picks one from the pair's drafter; training them is cmsd.train's.
"""
